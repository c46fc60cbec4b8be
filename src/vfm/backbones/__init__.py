from vfm.backbones.timm_backbone import Backbone, load_exported

__all__ = ["Backbone", "load_exported"]
