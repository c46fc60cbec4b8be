"""Tiny DINO-family checkpoints, in the layout `pretrain` writes (`checkpoints/last.pt`), for the
distillation tests: the teacher's encoder and its heads, untrained."""

from __future__ import annotations

from pathlib import Path

import torch

from vfm.backbones import Backbone

# the tiny teacher encoder of conftest's `mim_artifacts`: 7 px patches on 28 px, 1-channel images
BACKBONE = dict(name="vit_tiny_patch16_224", img_size=28, patch_size=7, in_chans=1,
                model_kwargs=dict(depth=1, embed_dim=24, num_heads=2))
HEAD = dict(hidden_dim=32, bottleneck_dim=16, head_layers=3, use_bn_in_head=False, norm_last_layer=False)


def tiny_dino_checkpoint(path: Path, kind: str = "dinov2", seed: int = 0) -> Path:
    """Write a last.pt of `kind` ("dino": [CLS] head only; "ibot": one shared head; "dinov2":
    separate [CLS] (64 prototypes) and patch (48) heads) and return its path."""
    from vfm.methods.dino import DINO
    from vfm.methods.dinov2 import DINOv2
    from vfm.methods.ibot import iBOT

    torch.manual_seed(seed)
    backbone = Backbone(**BACKBONE)
    if kind == "dino":
        method, extra = DINO(backbone, out_dim=64, **HEAD), {}
    elif kind == "ibot":
        method, extra = iBOT(backbone, out_dim=64, shared_head=True, **HEAD), {"shared_head": True}
    else:
        method = DINOv2(backbone, out_dim=64, patch_out_dim=48, separate_heads=True, **HEAD)
        extra = {"patch_out_dim": 48, "separate_heads": True}
    config = {"backbone": {"_target_": "vfm.backbones.Backbone", **BACKBONE},
              "method": {"_target_": f"{type(method).__module__}.{type(method).__name__}", "out_dim": 64, **HEAD, **extra}}
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"config": config, "encoder_prefix": "teacher.backbone.", "model": method.state_dict()}, path)
    return path
