"""I-JEPA's predictor: a narrow ViT that predicts the representations of target blocks from the
context encoder's tokens.

Assran et al., CVPR 2023; facebookresearch/ijepa `src/models/vision_transformer.py`
(`VisionTransformerPredictor`, built by `vit_predictor` in `src/helper.py` `init_model`).

The context tokens are projected to the predictor width and given the predictor's fixed 2-D
sin-cos position embedding of their patches; for each target block, one learnable mask token per
target patch, plus that patch's position embedding, is appended; Transformer blocks, a final
LayerNorm and a linear map back to the encoder width give the predictions at the mask tokens.
Each target block is predicted in its own sequence (context + that block's mask tokens), so target
blocks never attend to each other.
"""

from __future__ import annotations

from functools import partial

import torch
from timm.models.vision_transformer import Block, init_weights_vit_timm
from torch import Tensor, nn

from vfm.backbones.timm_backbone import select_attention, sincos_pos_embed_2d


class JEPAPredictor(nn.Module):
    """Context tokens [n_ctx * B, K_ctx, D] + patch indices -> [n_tgt * n_ctx * B, K_tgt, D].

    Args:
        embed_dim: the encoder width D.
        grid_size: the patch grid (H, W) the indices refer to.
        predictor_dim: the predictor width (384 in every official config).
        depth: Transformer blocks (12 for ViT-H/14, 6 in `init_model`'s default).
        num_heads: attention heads (the official code uses the encoder's head count).
        mlp_ratio, drop_path_rate: of the blocks (4, 0 officially).
        attn_impl: "auto", "fused" or "manual", as the encoder's (see `select_attention`).
    """

    def __init__(
        self,
        embed_dim: int,
        grid_size: tuple[int, int],
        *,
        predictor_dim: int = 384,
        depth: int = 12,
        num_heads: int = 12,
        mlp_ratio: float = 4.0,
        drop_path_rate: float = 0.0,
        attn_impl: str = "auto",
    ) -> None:
        super().__init__()
        if depth < 1:
            raise ValueError(f"predictor_depth must be >= 1, got {depth}")
        if predictor_dim % num_heads:
            raise ValueError(f"predictor_dim={predictor_dim} is not divisible by predictor_heads={num_heads}")
        self.grid_size = (int(grid_size[0]), int(grid_size[1]))
        self.attn_impl, self._attn_device = attn_impl, None
        self.embed = nn.Linear(embed_dim, predictor_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, predictor_dim))
        # fixed, rebuilt with the module (not saved in checkpoints)
        self.register_buffer("pos_embed", sincos_pos_embed_2d(predictor_dim, *self.grid_size), persistent=False)
        rates = torch.linspace(0, drop_path_rate, depth).tolist()  # stochastic depth decay rule
        norm = partial(nn.LayerNorm, eps=1e-6)
        self.blocks = nn.Sequential(*[
            Block(predictor_dim, num_heads, mlp_ratio, qkv_bias=True, drop_path=r, norm_layer=norm) for r in rates
        ])
        self.norm = norm(predictor_dim)
        self.proj = nn.Linear(predictor_dim, embed_dim)
        self._init_weights()

    def _init_weights(self) -> None:
        # `init_model` re-initialises every Linear after construction (undoing the class's per-depth
        # rescaling): truncated normal std 0.02, zero bias, as timm's ViT init; unit LayerNorms;
        # mask token N(0, 0.02) truncated
        nn.init.trunc_normal_(self.mask_token, std=0.02)
        self.apply(init_weights_vit_timm)

    def forward(self, context: Tensor, context_ids: Tensor, target_ids: Tensor) -> Tensor:
        """Predict every target block from every context block.

        Args:
            context: [n_ctx * B, K_ctx, D], the context encoder's patch tokens, context block j of
                image b at row j * B + b.
            context_ids: int64 [n_ctx, B, K_ctx], their patch indices.
            target_ids: int64 [n_tgt, B, K_tgt], the patches to predict.

        Returns:
            [n_tgt * n_ctx * B, K_tgt, D], target block i from context block j of image b at row
            (i * n_ctx + j) * B + b (the official `repeat_interleave_batch` order).
        """
        if self._attn_device != context.device.type:
            select_attention(self.blocks, self.attn_impl, context.device.type)
            self._attn_device = context.device.type
        n_ctx, batch, k_ctx = context_ids.shape
        n_tgt, _, k_tgt = target_ids.shape
        x = self.embed(context)
        pos = self.pos_embed.to(x.dtype)
        x = x + pos[context_ids.reshape(n_ctx * batch, k_ctx)]
        queries = self.mask_token.to(x.dtype) + pos[target_ids]  # [n_tgt, B, K_tgt, P]
        queries = queries.unsqueeze(1).expand(-1, n_ctx, -1, -1, -1).reshape(n_tgt * n_ctx * batch, k_tgt, -1)
        x = torch.cat([x.repeat(n_tgt, 1, 1), queries], dim=1)
        x = self.norm(self.blocks(x))
        return self.proj(x[:, k_ctx:])
