"""Random resized crops of a batch: torchvision's box sampling, vectorised, and one affine
resampling for all the boxes (with the flip). Used by :class:`vfm.data.transforms.MultiCropAugmentation`."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["resized_crops", "sample_crop_boxes"]


def resized_crops(
    x: Tensor, boxes: tuple[Tensor, Tensor, Tensor, Tensor], flip: Tensor, size: int, interpolation: str
) -> Tensor:
    """The boxes ``(top, left, h, w)`` (float ``[B]`` pixels of ``x``'s ``H x W``) of float images
    ``x [B, C, H, W]`` in [0, 1], each resized to ``size x size`` and mirrored where ``flip`` [B]."""
    b, c, height, width = x.shape
    top, left, h, w = boxes
    theta = torch.zeros(b, 2, 3, dtype=torch.float32)
    # With align_corners=False, normalised coordinates -1 / +1 are the outer pixel edges, so
    # the box [left, left + w) maps to x_in = (w / W) * x_out + (2 left + w) / W - 1 (W, H:
    # the canvas, which is the image itself unless smaller images were placed in it).
    theta[:, 0, 0] = torch.where(flip, -w / width, w / width)  # mirror = negate the x scale
    theta[:, 0, 2] = (2 * left + w) / width - 1
    theta[:, 1, 1] = h / height
    theta[:, 1, 2] = (2 * top + h) / height - 1
    grid = F.affine_grid(theta.to(x.device), [b, c, size, size], align_corners=False)
    # "border": crops sample up to half (bilinear) or two (bicubic) input pixels outside the
    # box, which for boxes touching the image edge would otherwise blend in zeros.
    out = F.grid_sample(x, grid, mode=interpolation, padding_mode="border", align_corners=False)
    if interpolation == "bicubic":
        out = out.clamp_(0.0, 1.0)  # the cubic kernel overshoots; PIL clips to the pixel range
    return out


def sample_crop_boxes(
    u: Tensor, height: int | Tensor, width: int | Tensor, scale: tuple[float, float]
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """torchvision ``RandomResizedCrop.get_params``, vectorised over the batch.

    ``u``: uniforms ``[B, 4, 10]`` (area fraction, log aspect ratio, top, left, per try).
    ``height`` / ``width``: the image size, one int for all or float64 ``[B, 1]`` per image.
    Returns float tensors ``top, left, h, w`` ``[B]`` in pixels (integers, as in torchvision).
    """
    per_image = isinstance(height, Tensor)
    # float32 like the uniforms (an int area multiplies them in float32 too, so one size for all
    # and per-image sizes give the same boxes)
    area = (height * width).float() if per_image else height * width
    log_lo, log_hi = math.log(3 / 4), math.log(4 / 3)
    target_area = area * (scale[0] + (scale[1] - scale[0]) * u[:, 0])
    ratio = torch.exp(log_lo + (log_hi - log_lo) * u[:, 1])
    # Computed in float64 so the rounding matches torchvision's Python float arithmetic.
    w = torch.round(torch.sqrt(target_area.double() * ratio.double()))
    h = torch.round(torch.sqrt(target_area.double() / ratio.double()))
    valid = (w > 0) & (w <= width) & (h > 0) & (h <= height)
    first = valid.to(torch.int8).argmax(dim=1)  # index of the first successful try
    found = valid.any(dim=1)
    rows = torch.arange(u.shape[0])
    w, h = w[rows, first], h[rows, first]
    if per_image:
        height, width = height[:, 0], width[:, 0]
    # torch.randint(0, H - h + 1) in torchvision: floor of a uniform over the H - h + 1 positions.
    top = torch.minimum(torch.floor(u[rows, 2, first].double() * (height - h + 1)), height - h)
    left = torch.minimum(torch.floor(u[rows, 3, first].double() * (width - w + 1)), width - w)
    fh, fw = _fallback_box(height, width)
    w = torch.where(found, w, fw)
    h = torch.where(found, h, fh)
    top = torch.where(found, top, torch.floor((height - fh) / 2))
    left = torch.where(found, left, torch.floor((width - fw) / 2))
    return top.float(), left.float(), h.float(), w.float()


def _fallback_box(height: int | Tensor, width: int | Tensor) -> tuple[Tensor, Tensor]:
    """After 10 failed tries: the largest centred box with an allowed aspect ratio (float64 h, w)."""
    height = torch.as_tensor(height, dtype=torch.float64)
    width = torch.as_tensor(width, dtype=torch.float64)
    in_ratio = width / height
    tall, wide = in_ratio < 3 / 4, in_ratio > 4 / 3
    fw = torch.where(wide, torch.round(height * (4 / 3)), width)
    fh = torch.where(tall, torch.round(width / (3 / 4)), height)
    return fh, fw
