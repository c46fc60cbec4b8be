"""Photometric operations on batches of float images in [0, 1], ``[n, C, H, W]``, each with a
per-sample strength (an ``[n]`` tensor): the colour jitter, grayscale, blur and solarisation of the
multi-crop recipes (:class:`vfm.data.transforms.MultiCropAugmentation`).

They follow torchvision's ``functional_tensor`` definitions (same luma weights, same blend and
hue arithmetic), vectorised over samples so one call serves a whole batch.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "LUMA",
    "adjust_brightness",
    "adjust_contrast",
    "adjust_hue",
    "adjust_saturation",
    "blend",
    "gaussian_blur",
    "grayscale",
    "hsv_to_rgb",
    "rgb_to_hsv",
    "solarize",
]

# ITU-R 601-2 luma, the weights torchvision's rgb_to_grayscale (and PIL's convert("L")) use.
LUMA = (0.2989, 0.587, 0.114)


def grayscale(x: Tensor) -> Tensor:
    """[n, 3, H, W] -> [n, 1, H, W] luma; 1-channel input is returned as is."""
    if x.shape[1] == 1:
        return x
    r, g, b = x.unbind(1)
    return (LUMA[0] * r + LUMA[1] * g + LUMA[2] * b).unsqueeze(1)


def blend(a: Tensor, b: Tensor, factor: Tensor) -> Tensor:
    """``factor * a + (1 - factor) * b`` clamped to [0, 1] (torchvision's ``_blend``), per sample."""
    f = factor.view(-1, 1, 1, 1)
    return (f * a + (1 - f) * b).clamp_(0, 1)


def adjust_brightness(x: Tensor, f: Tensor) -> Tensor:
    return blend(x, torch.zeros_like(x), f)


def adjust_contrast(x: Tensor, f: Tensor) -> Tensor:
    # Blend towards the mean luma of the whole image (a per-sample scalar).
    mean = grayscale(x).mean(dim=(1, 2, 3), keepdim=True)
    return blend(x, mean, f)


def adjust_saturation(x: Tensor, f: Tensor) -> Tensor:
    return blend(x, grayscale(x), f)


def adjust_hue(x: Tensor, shift: Tensor) -> Tensor:
    h, s, v = rgb_to_hsv(x)
    h = torch.remainder(h + shift.view(-1, 1, 1), 1.0)
    return hsv_to_rgb(h, s, v)


def rgb_to_hsv(x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """[n, 3, H, W] in [0, 1] -> hue, saturation, value [n, H, W], hue in [0, 1)."""
    r, g, b = x.unbind(1)
    maxc, _ = x.max(dim=1)
    minc, _ = x.min(dim=1)
    delta = maxc - minc
    s = delta / torch.where(maxc > 0, maxc, torch.ones_like(maxc))
    safe = torch.where(delta > 0, delta, torch.ones_like(delta))
    hr = (g - b) / safe
    hg = (b - r) / safe + 2.0
    hb = (r - g) / safe + 4.0
    h = torch.where(maxc == r, hr, torch.where(maxc == g, hg, hb))
    h = torch.where(delta > 0, torch.remainder(h / 6.0, 1.0), torch.zeros_like(h))
    return h, s, maxc


def hsv_to_rgb(h: Tensor, s: Tensor, v: Tensor) -> Tensor:
    h6 = h * 6.0
    i = torch.floor(h6)
    f = h6 - i
    i = i.long() % 6
    p = v * (1 - s)
    q = v * (1 - s * f)
    t = v * (1 - s * (1 - f))
    # For each of the 6 hue sectors, which of (v, q, p, t) is R, G, B.
    candidates = torch.stack([v, q, p, t], dim=1)  # [n, 4, H, W]
    table = torch.tensor([[0, 3, 2], [1, 0, 2], [2, 0, 3], [2, 1, 0], [3, 2, 0], [0, 2, 1]], device=h.device)
    sel = table[i].permute(0, 3, 1, 2)  # [n, 3, H, W]
    return torch.gather(candidates, 1, sel)


def gaussian_blur(x: Tensor, sigma: Tensor) -> Tensor:
    """Separable Gaussian blur with a per-sample ``sigma`` [n] (pixels), reflect padding."""
    n, c, height, width = x.shape
    radius = max(1, math.ceil(3 * float(sigma.max())))
    radius = min(radius, height - 1, width - 1)  # reflect padding needs pad < size
    if radius < 1:
        return x
    t = torch.arange(-radius, radius + 1, dtype=torch.float32, device=x.device)
    kernel = torch.exp(-(t[None, :] ** 2) / (2 * sigma[:, None].to(x.device) ** 2))
    kernel = kernel / kernel.sum(dim=1, keepdim=True)  # [n, K], each sums to 1 (keeps the mean)
    kernel = kernel.repeat_interleave(c, dim=0)  # one kernel per (sample, channel) group
    k = 2 * radius + 1
    # Fold the batch into channels so every sample gets its own kernel in one grouped conv.
    y = x.reshape(1, n * c, height, width)
    y = F.conv2d(F.pad(y, (radius, radius, 0, 0), mode="reflect"), kernel.view(n * c, 1, 1, k), groups=n * c)
    y = F.conv2d(F.pad(y, (0, 0, radius, radius), mode="reflect"), kernel.view(n * c, 1, k, 1), groups=n * c)
    return y.reshape(n, c, height, width)


def solarize(x: Tensor) -> Tensor:
    """Invert the pixels at or above the threshold 0.5 (PIL's 128 of 255), keep the rest."""
    return torch.where(x >= 0.5, 1.0 - x, x)
