"""The token API of `Backbone` for timm's `Eva` family: EVA-01 and EVA-02 encoders.

EVA-02 (Fang et al. 2024, baaivision/EVA `EVA-02/asuka/modeling_pretrain.py`) is a ViT with a
SwiGLU MLP, sub-LN (a LayerNorm inside the MLP, timm's `scale_mlp`), 2-D rotary position embeddings
in every attention layer on top of the absolute one, and no layer scale; timm implements it as
`Eva` (`eva02_tiny/small/base/large_patch14_224`; EVA-01's giant is `eva_giant_patch14_224`).
Its blocks take the rotary embedding as an argument, so the ViT path of `Backbone.forward_tokens`
does not apply; this is the same forward for `Eva`, with masked patch embeddings replaced by the
mask token before the position embeddings, as `VisionTransformerForMaskedImageModeling.
forward_features` does (`x * (1 - w) + mask_token * w`, then [CLS], then `pos_embed`).

EVA-02's MIM model puts its final LayerNorm on every token before `lm_head`; build the timm model
with `global_pool="token"` (conf/backbone/eva02_base.yaml) so that `model.norm` is that LayerNorm
(timm's default average pooling moves it after the pooling, `fc_norm`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.utils.checkpoint

if TYPE_CHECKING:
    from vfm.backbones.timm_backbone import Backbone


def eva_forward_tokens(backbone: Backbone, x: torch.Tensor, mask: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """`Backbone.forward_tokens` for a timm `Eva`: {"global": [B, D], "patch": [B, N, D], "prefix": [B, P, D]};
    `mask` [B, N] bool replaces those patch embeddings with `backbone.mask_token`."""
    m = backbone.model
    backbone._select_attention(x.device)
    t = backbone.masked_patch_embed(x, mask)  # [B, N, D], or [B, H, W, D] with dynamic_img_size
    t, rope = m._pos_embed(t)  # + [CLS] and the absolute position embedding; the rotary table
    t = m.norm_pre(t)
    per_block = getattr(m, "rope_mixed", False) and rope is not None  # timm's depth-dependent RoPE variant
    checkpointed = backbone.grad_checkpointing and backbone.training and torch.is_grad_enabled()
    for i, block in enumerate(m.blocks):
        r = rope[i] if per_block else rope
        if checkpointed:
            t = torch.utils.checkpoint.checkpoint(block, t, rope=r, use_reentrant=False)
        else:
            t = block(t, rope=r)
    t = m.norm(t)
    p = backbone.num_prefix_tokens
    return {"global": m.forward_head(t, pre_logits=True), "patch": t[:, p:], "prefix": t[:, :p]}
