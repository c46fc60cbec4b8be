from vfm.backbones.timm_backbone import Backbone, exported_metadata, load_exported, sincos_pos_embed_2d

__all__ = ["Backbone", "exported_metadata", "load_exported", "sincos_pos_embed_2d"]
