"""MAE reconstructions as an image grid (the layout of He et al. 2022, Fig. 2 and 3).

Four rows, one column per image: the original, the masked input the encoder saw (masked patches
grey), the reconstruction, and the reconstruction with the visible patches pasted back in.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor
from torchvision.utils import make_grid

from vfm.viz.render import _upscale, auto_scale, to_display

__all__ = ["reconstruction_grid", "denormalize"]

_MASK_GREY = 0.5


def denormalize(x: Tensor, mean: Sequence[float], std: Sequence[float]) -> Tensor:
    """Normalised images [B, C, H, W] back to [0, 1] pixel values (clamped)."""
    m = torch.tensor(mean, dtype=x.dtype, device=x.device).reshape(1, -1, 1, 1)
    s = torch.tensor(std, dtype=x.dtype, device=x.device).reshape(1, -1, 1, 1)
    return (x * s + m).clamp(0.0, 1.0)


def _patch_mask_image(mask: Tensor, grid: tuple[int, int], patch_size: int) -> Tensor:
    """[B, N] patch mask -> [B, 1, H, W] pixel mask (1 where the patch was masked)."""
    m = mask.reshape(mask.shape[0], 1, *grid).float()
    return m.repeat_interleave(patch_size, dim=2).repeat_interleave(patch_size, dim=3)


@torch.no_grad()
def reconstruction_grid(
    images: Tensor,
    reconstructions: Tensor,
    mask: Tensor,
    patch_size: int,
    *,
    scale: int | None = None,
    padding: int = 2,
) -> Tensor:
    """images, reconstructions: [B, C, H, W] in [0, 1]; mask: [B, N] bool (True = masked).
    Returns a float [3, H', W'] grid in [0, 1] (what TensorBoard's add_image takes)."""
    grid = (images.shape[-2] // patch_size, images.shape[-1] // patch_size)
    pix = _patch_mask_image(mask.cpu(), grid, patch_size)
    orig, rec = to_display(images.cpu()), to_display(reconstructions.cpu())
    masked = orig * (1 - pix) + _MASK_GREY * pix
    pasted = orig * (1 - pix) + rec * pix
    s = auto_scale(max(images.shape[-2:])) if scale is None else int(scale)
    tiles = _upscale(torch.cat([orig, masked, rec, pasted]), s)
    return make_grid(tiles, nrow=images.shape[0], padding=padding, pad_value=1.0)
