"""MAE's light-weight decoder (He et al. 2022, facebookresearch/mae `models_mae.py`,
`MaskedAutoencoderViT.forward_decoder`).

The encoder's visible tokens are projected to the decoder width, a shared learnable mask token is
inserted at every masked position, the sequence is un-shuffled back to patch order, fixed 2-D sin-cos
position embeddings are added, and a few Transformer blocks followed by a linear layer predict each
patch's pixels. Prefix tokens ([CLS]) pass through the decoder and are dropped from the prediction.
"""

from __future__ import annotations

from functools import partial

import torch
from timm.models.vision_transformer import Block
from torch import Tensor, nn

from vfm.backbones.timm_backbone import select_attention, sincos_pos_embed_2d


class MAEDecoder(nn.Module):
    """[B, P + K, D_enc] visible tokens + restore order -> [B, N, out_dim] per-patch predictions."""

    def __init__(
        self,
        embed_dim: int,
        out_dim: int,
        *,
        decoder_dim: int = 512,
        depth: int = 8,
        num_heads: int = 16,
        mlp_ratio: float = 4.0,
        num_prefix_tokens: int = 1,
        attn_impl: str = "auto",
    ) -> None:
        super().__init__()
        self.attn_impl = attn_impl  # as the encoder's backbone.attn_impl (see select_attention)
        self._attn_device: str | None = None
        if decoder_dim % num_heads:
            raise ValueError(f"MAE decoder: decoder_dim={decoder_dim} is not divisible by num_heads={num_heads}")
        self.num_prefix_tokens = num_prefix_tokens
        self.embed = nn.Linear(embed_dim, decoder_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_dim))
        # LayerNorm eps 1e-6 in every block, as the official decoder (timm's Block defaults to 1e-5)
        norm = partial(nn.LayerNorm, eps=1e-6)
        self.blocks = nn.Sequential(
            *[Block(decoder_dim, num_heads, mlp_ratio, qkv_bias=True, norm_layer=norm) for _ in range(depth)]
        )
        self.norm = nn.LayerNorm(decoder_dim, eps=1e-6)
        self.pred = nn.Linear(decoder_dim, out_dim)
        self._pos_cache: dict[tuple[int, int], Tensor] = {}
        self._init_weights()

    def _init_weights(self) -> None:
        # the official initialisation: mask token N(0, 0.02), xavier-uniform linears, unit LayerNorms
        nn.init.normal_(self.mask_token, std=0.02)
        xavier_init_(self)

    def pos_embed(self, grid: tuple[int, int], dim: int, device: torch.device) -> Tensor:
        if grid not in self._pos_cache:  # fixed, so computed once per grid (not a buffer: not saved)
            self._pos_cache[grid] = sincos_pos_embed_2d(dim, *grid)
        return self._pos_cache[grid].to(device)

    def forward(self, tokens: Tensor, ids_restore: Tensor, grid: tuple[int, int]) -> Tensor:
        if self._attn_device != tokens.device.type:
            select_attention(self.blocks, self.attn_impl, tokens.device.type)
            self._attn_device = tokens.device.type
        p = self.num_prefix_tokens
        x = self.embed(tokens)
        b, n = ids_restore.shape
        fill = self.mask_token.to(x.dtype).expand(b, n - (x.shape[1] - p), -1)
        patches = torch.cat([x[:, p:], fill], dim=1)  # visible first, then masked: the shuffled order
        patches = torch.gather(patches, 1, ids_restore.unsqueeze(-1).expand(-1, -1, x.shape[-1]))
        patches = patches + self.pos_embed(grid, x.shape[-1], x.device).to(x.dtype)
        # prefix tokens get a zero position embedding, as the official [CLS] slot of its table
        x = self.norm(self.blocks(torch.cat([x[:, :p], patches], dim=1)))
        return self.pred(x[:, p:])


@torch.no_grad()
def xavier_init_(module: nn.Module) -> None:
    """MAE's `_init_weights` over `module`: xavier-uniform weights and zero biases for every
    `nn.Linear` (following the official JAX ViT), weight 1 and bias 0 for every LayerNorm."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm) and m.elementwise_affine:
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
