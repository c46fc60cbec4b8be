"""Predicted segmentation masks next to the ground truth, as an image grid.

Three rows: the inputs, their ground-truth masks, the predicted masks. Classes are coloured with
the PASCAL VOC palette (the bit-interleaved colour map of the VOC development kit's
``labelcolormap``, so VOC masks look as they do in the data set), ignored pixels (255) white.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torchvision.utils import make_grid

from vfm.viz.render import auto_scale, to_display

__all__ = ["mask_colours", "segmentation_grid"]

_IGNORE = 255


def mask_colours(masks: Tensor) -> Tensor:
    """Class-index masks ``[B, H, W]`` as RGB ``[B, 3, H, W]`` in [0, 1] (VOC palette, 255 white)."""
    idx = torch.arange(256)
    rgb = torch.zeros(256, 3, dtype=torch.int64)
    c = idx.clone()
    for shift in range(7, -1, -1):  # each 3 bits of the index fill one bit of R, G and B, high bit first
        for ch in range(3):
            rgb[:, ch] |= ((c >> ch) & 1) << shift
        c = c >> 3
    lut = rgb.float() / 255.0
    lut[_IGNORE] = 1.0
    return lut[masks.long().cpu()].movedim(-1, 1)


def segmentation_grid(images: Tensor, masks: Tensor, preds: Tensor, *, scale: int | None = None,
                      padding: int = 2) -> Tensor:
    """Rows: images (uint8 or [0, 1] floats, ``[B, C, H, W]``), ground truth and prediction
    (``[B, H, W]`` class indices). Returns ``[3, H_grid, W_grid]`` in [0, 1] for TensorBoard / PNG."""
    if masks.shape != preds.shape or masks.shape[0] != images.shape[0] or masks.shape[-2:] != images.shape[-2:]:
        raise ValueError(f"images {tuple(images.shape)}, masks {tuple(masks.shape)} and predictions "
                         f"{tuple(preds.shape)} must agree in batch and size")
    rows = torch.cat([to_display(images).cpu(), mask_colours(masks), mask_colours(preds)])
    s = auto_scale(max(images.shape[-2:])) if scale is None else int(scale)
    if s > 1:
        rows = F.interpolate(rows, scale_factor=s, mode="nearest")
    return make_grid(rows, nrow=images.shape[0], padding=padding, pad_value=1.0)
