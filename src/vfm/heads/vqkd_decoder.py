"""BEiT v2's VQ-KD decoder (Peng et al. 2022, microsoft/unilm `beit2/modeling_vqkd.py`, `VQKD.decode`).

The quantized code map [B, h, w, d] is read by a small ViT whose "patch embedding" is a 1 x 1
convolution from the code dimension to the decoder width (here the equivalent Linear), with a [CLS]
token and a learned absolute position embedding (`use_abs_pos_emb=True`); its blocks are followed,
as in the mean-pooling configuration of `modeling_finetune.VisionTransformer`, by a LayerNorm on the
patch tokens (`fc_norm`), and the task layer Linear-Tanh-Linear maps each token to the teacher's
width (`decode_task_layer`). Initialisation as `modeling_finetune.VisionTransformer`: truncated
normal (std 0.02) linears and tokens, unit LayerNorms, and each block's output projections scaled
by 1 / sqrt(2 * layer) (`fix_init_weight`); the code embedding keeps PyTorch's default, as the
official convolution does.
"""

from __future__ import annotations

import math
from functools import partial

import torch
from timm.layers import resample_abs_pos_embed
from timm.models.vision_transformer import Block
from torch import Tensor, nn

from vfm.backbones.timm_backbone import select_attention
from vfm.heads.tokenizer import task_layer


def beit2_init_(module: nn.Module) -> None:
    """BEiT v2's `_init_weights`: truncated-normal (std 0.02) Linear weights, zero biases, unit LayerNorms."""
    for m in module.modules():
        if isinstance(m, nn.Linear):  # timm's trunc_normal_ (cut at +-2, i.e. a plain N(0, 0.02^2))
            nn.init.trunc_normal_(m.weight, std=0.02)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
        if isinstance(m, (nn.Linear, nn.LayerNorm)) and m.bias is not None:
            nn.init.zeros_(m.bias)


class VQKDDecoder(nn.Module):
    """Code vectors [B, N, code_dim] on a grid -> per-patch predictions [B, N, out_dim].

    Args:
        code_dim: the codebook dimension (32 in BEiT v2).
        out_dim: the teacher's feature width (512 for CLIP-B/16's projected features).
        dim, depth, num_heads, mlp_ratio: the decoder ViT (BEiT v2: 768, 3 (or 1), 12, 4).
        grid: the code grid the position embedding is made for (other grids interpolate it).
        attn_impl: as the backbone's (see `select_attention`).
    """

    def __init__(self, code_dim: int, out_dim: int, *, dim: int = 768, depth: int = 3, num_heads: int = 12,
                 mlp_ratio: float = 4.0, grid: tuple[int, int] = (14, 14), attn_impl: str = "auto") -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"VQ-KD decoder: decoder_dim={dim} is not divisible by decoder_heads={num_heads}")
        self.grid, self.attn_impl = tuple(grid), attn_impl
        self._attn_device: str | None = None
        self.embed = nn.Linear(code_dim, dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + self.grid[0] * self.grid[1], dim))
        norm = partial(nn.LayerNorm, eps=1e-6)
        self.blocks = nn.Sequential(*[Block(dim, num_heads, mlp_ratio, qkv_bias=True, norm_layer=norm) for _ in range(depth)])
        self.fc_norm = norm(dim)
        self.task_layer = task_layer(dim, out_dim)
        embed_state = {k: v.clone() for k, v in self.embed.state_dict().items()}
        beit2_init_(self)
        self.embed.load_state_dict(embed_state)  # the official 1 x 1 conv keeps PyTorch's default init
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        with torch.no_grad():
            for i, block in enumerate(self.blocks):
                block.attn.proj.weight.div_(math.sqrt(2.0 * (i + 1)))
                block.mlp.fc2.weight.div_(math.sqrt(2.0 * (i + 1)))

    def no_weight_decay(self) -> set[str]:
        """Parameters VQ-KD's optimizer leaves without weight decay (`VQKD.no_weight_decay`)."""
        return {"cls_token", "pos_embed"}

    def forward(self, z_q: Tensor, grid: tuple[int, int]) -> Tensor:
        if self._attn_device != z_q.device.type:
            select_attention(self.blocks, self.attn_impl, z_q.device.type)
            self._attn_device = z_q.device.type
        x = self.embed(z_q)
        pos = self.pos_embed
        if tuple(grid) != self.grid:
            pos = resample_abs_pos_embed(pos, new_size=list(grid), old_size=list(self.grid), num_prefix_tokens=1)
        x = torch.cat([self.cls_token.to(x.dtype).expand(x.shape[0], -1, -1), x], dim=1) + pos.to(x.dtype)
        x = self.fc_norm(self.blocks(x)[:, 1:])
        return self.task_layer(x)
