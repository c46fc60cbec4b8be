"""BEiT's weight initialisation for a timm ViT or BEiT model.

Bao et al., "BEiT: BERT Pre-Training of Image Transformers", ICLR 2022; official code:
microsoft/unilm `beit/modeling_pretrain.py` (`VisionTransformerForMaskedImageModeling`:
`_init_weights`, `fix_init_weight`); EVA-01 (baaivision/EVA `EVA-01/eva/modeling_pretrain.py`)
uses the same.

Every Linear and Conv2d weight, the [CLS] token and the absolute position embedding are drawn from
a normal with std 0.02 truncated at +-1 std (BEiT's own `trunc_normal_` passes `a=-std, b=std`;
timm's default truncates at +-2 in absolute value, i.e. not at all for std 0.02, so the drawn
weights have std ~0.011 here instead of 0.02); biases are 0 and LayerNorms (1, 0). Then
`fix_init_weight` divides the output projections of block l (1-based), `attn.proj` and `mlp.fc2`,
by sqrt(2 l), so deeper blocks start with smaller residual updates.
"""

from __future__ import annotations

import math

import torch
from torch import nn

__all__ = ["beit_init_", "fix_init_weight_", "trunc_normal_sigma_"]


def trunc_normal_sigma_(tensor: torch.Tensor, std: float = 0.02) -> torch.Tensor:
    """Fill `tensor` from N(0, std^2) truncated at +-std (BEiT's / EVA's `trunc_normal_`)."""
    return nn.init.trunc_normal_(tensor, mean=0.0, std=std, a=-std, b=std)


def fix_init_weight_(blocks: nn.Module) -> None:
    """Divide `attn.proj.weight` and `mlp.fc2.weight` of block l (1-based) by sqrt(2 l) (BEiT's
    `fix_init_weight`; timm's `Beit` applies it at construction, its `VisionTransformer` does not)."""
    with torch.no_grad():
        for layer_id, block in enumerate(blocks, start=1):
            scale = math.sqrt(2.0 * layer_id)
            block.attn.proj.weight.div_(scale)
            block.mlp.fc2.weight.div_(scale)


@torch.no_grad()
def beit_init_(model: nn.Module, std: float = 0.02) -> None:
    """Re-initialise a timm ViT / BEiT `model` in place as BEiT's pretraining model is (see module
    docstring). LayerScale gains, relative position bias tables and q/v biases keep timm's values
    (init_values, zeros, zeros: the same as BEiT's)."""
    for m in model.modules():
        if isinstance(m, (nn.Linear, nn.Conv2d)):
            trunc_normal_sigma_(m.weight, std)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm) and m.elementwise_affine:
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
    for name in ("cls_token", "pos_embed"):
        p = getattr(model, name, None)
        if isinstance(p, nn.Parameter):
            trunc_normal_sigma_(p, std)
    fix_init_weight_(model.blocks)
