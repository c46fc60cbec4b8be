"""Image grids of attention maps and patch PCA, as tensors (for TensorBoard) and PNG files.

Layouts (one tile per image or map, nearest-neighbour upsampling so patches stay visible as blocks):
- attention: one row per image: the input, then each head's last-layer [CLS] attention map
  (min-max scaled per map, like the per-map colour scaling of `plt.imsave` in DINO's
  `visualize_attention.py`), coloured with a viridis-like map. With a threshold, a head's tile keeps
  the colours only on the patches holding that fraction of the mass and shows the dimmed input elsewhere.
- pca: two rows: the inputs, then their patch-feature PCA as RGB (DINOv2 Fig. 1 style).

Grids are float [3, H, W] tensors in [0, 1], what `SummaryWriter.add_image(tag, grid)` takes.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.utils import make_grid, save_image

from vfm.viz.attention import as_vision_transformer, attention_threshold_mask, last_layer_attention
from vfm.viz.pca import patch_pca_rgb, patch_tokens

__all__ = [
    "attention_grid",
    "auto_scale",
    "colormap",
    "pca_grid",
    "render_figures",
    "save_png",
    "to_display",
]

# The ten-colour viridis palette (van der Walt & Smith's perceptually uniform map), sampled at
# equal steps and linearly interpolated: enough for heat maps, without a matplotlib dependency.
_VIRIDIS_10 = (
    (0x44, 0x01, 0x54), (0x48, 0x28, 0x78), (0x3E, 0x4A, 0x89), (0x31, 0x68, 0x8E), (0x26, 0x82, 0x8E),
    (0x1F, 0x9E, 0x89), (0x35, 0xB7, 0x79), (0x6D, 0xCD, 0x59), (0xB4, 0xDE, 0x2C), (0xFD, 0xE7, 0x25),
)
# Outside a thresholded head's kept patches the input is shown at this brightness, for context.
_DIM = 0.3


def colormap(values: Tensor) -> Tensor:
    """Map values in [0, 1] (shape [..., H, W]) to viridis-like RGB [..., 3, H, W] in [0, 1]."""
    lut = torch.tensor(_VIRIDIS_10, dtype=torch.float32, device=values.device) / 255.0
    pos = values.float().clamp(0.0, 1.0) * (lut.shape[0] - 1)
    lo = pos.floor().long().clamp(max=lut.shape[0] - 2)
    frac = (pos - lo).unsqueeze(-1)
    rgb = lut[lo] * (1.0 - frac) + lut[lo + 1] * frac  # [..., H, W, 3]
    return rgb.movedim(-1, -3)


def to_display(images: Tensor) -> Tensor:
    """Images [B, C, H, W] as displayable RGB floats [B, 3, H, W] in [0, 1].

    uint8 images are divided by 255; float images are taken to be in [0, 1] already (un-normalised).
    One channel is repeated to grey RGB.
    """
    if images.ndim != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"images must be [B, 1 or 3, H, W], got shape {tuple(images.shape)}")
    x = images.float() / 255.0 if images.dtype == torch.uint8 else images.float().clamp(0.0, 1.0)
    return x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x


def auto_scale(img_size: int, min_tile: int = 112) -> int:
    """The integer upsampling that makes an `img_size` tile at least `min_tile` px (28 px -> 4x)."""
    return max(1, math.ceil(min_tile / max(1, int(img_size))))


def _upscale(tiles: Tensor, scale: int) -> Tensor:
    if scale < 1:
        raise ValueError(f"scale must be an integer >= 1, got {scale}")
    return tiles if scale == 1 else F.interpolate(tiles, scale_factor=scale, mode="nearest")


def attention_grid(
    images: Tensor,
    maps: Tensor,
    *,
    threshold: float | None = None,
    scale: int = 1,
    padding: int = 2,
) -> Tensor:
    """One row per image: the input, then one tile per head. Returns [3, H_grid, W_grid] in [0, 1].

    Args:
        images: [B, C, H, W] inputs as uint8 or floats in [0, 1] (not normalised).
        maps: [B, heads, h, w] attention maps from `last_layer_attention`.
        threshold: if set, each head's tile shows only the patches that hold this fraction of its
            attention mass (`attention_threshold_mask`), over the dimmed input.
        scale: nearest-neighbour upsampling of every tile (small images are unreadable at 1x).
    """
    if maps.ndim != 4 or maps.shape[0] != images.shape[0]:
        raise ValueError(f"maps must be [B, heads, h, w] with B={images.shape[0]}, got {tuple(maps.shape)}")
    disp = to_display(images).cpu()
    b, heads = maps.shape[:2]
    size = disp.shape[-2:]
    m = maps.detach().float().cpu()
    flat = m.flatten(-2)
    lo, hi = flat.amin(-1, keepdim=True), flat.amax(-1, keepdim=True)
    norm = ((flat - lo) / (hi - lo).clamp_min(1e-12)).reshape(m.shape)
    tiles = colormap(F.interpolate(norm, size=size, mode="nearest"))  # [B, heads, 3, H, W]
    if threshold is not None:
        keep = attention_threshold_mask(m, threshold).float()
        keep = F.interpolate(keep, size=size, mode="nearest").unsqueeze(2)
        tiles = keep * tiles + (1.0 - keep) * _DIM * disp.unsqueeze(1)
    rows = torch.cat([disp.unsqueeze(1), tiles], dim=1).flatten(0, 1)  # [B * (1 + heads), 3, H, W]
    return make_grid(_upscale(rows, scale), nrow=1 + heads, padding=padding, pad_value=1.0)


def pca_grid(images: Tensor, rgb: Tensor, *, scale: int = 1, padding: int = 2) -> Tensor:
    """Two rows: the inputs, then their PCA colours ([B, 3, h, w] from `patch_pca_rgb`). [3, H, W]."""
    if rgb.ndim != 4 or rgb.shape[:2] != (images.shape[0], 3):
        raise ValueError(f"rgb must be [B, 3, h, w] with B={images.shape[0]}, got {tuple(rgb.shape)}")
    disp = to_display(images).cpu()
    up = F.interpolate(rgb.detach().float().cpu(), size=disp.shape[-2:], mode="nearest")
    return make_grid(_upscale(torch.cat([disp, up]), scale), nrow=images.shape[0], padding=padding, pad_value=1.0)


def save_png(grid: Tensor, path: str | Path) -> Path:
    """Write a [3, H, W] grid in [0, 1] as a PNG (creating the folder); returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_image(grid, str(path))
    return path


@torch.no_grad()
def render_figures(
    encoder: nn.Module,
    images: Tensor,
    *,
    mean: Sequence[float],
    std: Sequence[float],
    threshold: float | None = None,
    foreground_threshold: float | None = None,
    scale: int | None = None,
) -> dict[str, Tensor]:
    """Attention and PCA grids for uint8 `images` [B, C, H, W]: {"attention": [3, H, W], "pca": [3, H, W]}
    (no "attention" for an encoder without a [CLS] token).

    `encoder` is a ViT (vfm `Backbone` or plain timm); the images are normalised with `mean`/`std`
    and run on the encoder's device in eval mode (restored afterwards, so this can run mid-training).
    `scale=None` picks `auto_scale` of the image size.
    """
    from vfm.data.transforms import normalize

    device = next(encoder.parameters()).device
    x = normalize(images, mean, std).to(device)
    was_training = encoder.training
    encoder.eval()
    try:
        # an encoder without a [CLS] token (I-JEPA) has no [CLS] attention to show: PCA only
        has_cls = getattr(as_vision_transformer(encoder), "cls_token", None) is not None
        maps = last_layer_attention(encoder, x) if has_cls else None
        tokens, grid = patch_tokens(encoder, x)
    finally:
        encoder.train(was_training)
    rgb = patch_pca_rgb(tokens, grid, foreground_threshold=foreground_threshold)
    s = auto_scale(max(images.shape[-2:])) if scale is None else int(scale)
    grids = {} if maps is None else {"attention": attention_grid(images, maps, threshold=threshold, scale=s)}
    return {**grids, "pca": pca_grid(images, rgb, scale=s)}
