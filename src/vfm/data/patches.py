"""Images <-> per-patch pixel vectors, in MAE's layout (He et al. 2022, facebookresearch/mae
`models_mae.py`, `patchify` / `unpatchify`): patches in row-major order, each flattened as
(row-in-patch, column-in-patch, channel)."""

from __future__ import annotations

from torch import Tensor


def patchify(images: Tensor, patch_size: int) -> Tensor:
    """[B, C, H, W] -> [B, (H/p) * (W/p), p * p * C]."""
    b, c, h, w = images.shape
    p = patch_size
    if h % p or w % p:
        raise ValueError(f"patchify: image size {h}x{w} is not a multiple of the patch size {p}")
    x = images.reshape(b, c, h // p, p, w // p, p)
    return x.permute(0, 2, 4, 3, 5, 1).reshape(b, (h // p) * (w // p), p * p * c)


def unpatchify(patches: Tensor, patch_size: int, grid: tuple[int, int], channels: int) -> Tensor:
    """[B, gh * gw, p * p * C] -> [B, C, gh * p, gw * p] (the inverse of `patchify`)."""
    b = patches.shape[0]
    (gh, gw), p = grid, patch_size
    x = patches.reshape(b, gh, gw, p, p, channels)
    return x.permute(0, 5, 1, 3, 2, 4).reshape(b, channels, gh * p, gw * p)
