"""Random erasing (Zhong et al. 2020, "Random Erasing Data Augmentation"), batched and seeded.

DeiT trains with timm's ``RandomErasing(0.25, mode="pixel", max_count=1)`` applied to each
normalised image after RandAugment (facebookresearch/deit ``main.py`` ``--reprob 0.25 --remode
pixel --recount 1``; timm ``transforms_factory.transforms_imagenet_train``). This is the same
rule on a whole batch: per image, with probability ``probability``, a box of area
U(``min_area``, ``max_area``) x the image area and aspect ratio log-uniform in
[``min_aspect``, 1 / ``min_aspect``] (10 tries, the first that fits strictly inside) is replaced
by per-pixel N(0, 1) noise (``"pixel"``), a per-channel N(0, 1) colour (``"rand"``) or 0
(``"const"``). ``max_count > 1`` erases 1..max_count boxes (uniform), each with the area divided
by that count, as timm does.

Randomness: every uniform is drawn from ``generator`` in a fixed order and amount (the noise
for every pixel of the batch in ``"pixel"`` mode), so the same seed gives the same boxes and
noise whichever images are erased.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["ERASING_MODES", "random_erasing"]

ERASING_MODES = ("pixel", "rand", "const")


def random_erasing(
    x: Tensor,
    generator: torch.Generator,
    *,
    probability: float = 0.25,
    mode: str = "pixel",
    max_count: int = 1,
    min_area: float = 0.02,
    max_area: float = 1 / 3,
    min_aspect: float = 0.3,
) -> Tensor:
    """Erase boxes of normalised images ``x`` float ``[B, C, H, W]``; returns a new tensor.

    Box sampling follows timm's ``RandomErasing._erase``: ``h = round(sqrt(area * aspect))``,
    ``w = round(sqrt(area / aspect))``, accepted when ``h < H`` and ``w < W``, top-left uniform
    over the ``H - h + 1`` x ``W - w + 1`` positions.
    """
    if mode not in ERASING_MODES:
        raise ValueError(f"random erasing: mode must be one of {ERASING_MODES}, got {mode!r}")
    if not 0.0 <= probability <= 1.0 or max_count < 1:
        raise ValueError(f"random erasing: need probability in [0, 1] and max_count >= 1, got {probability}, {max_count}")
    b, c, height, width = x.shape
    apply_u = torch.rand(b, generator=generator)
    count_u = torch.rand(b, generator=generator)
    box_u = torch.rand(b, max_count, 4, 10, generator=generator)  # area, log-aspect, top, left per try
    noise_shape = (b, max_count, c, height, width) if mode == "pixel" else (b, max_count, c, 1, 1)
    noise = torch.randn(noise_shape, generator=generator) if mode != "const" else torch.zeros(noise_shape)
    count = 1 + torch.floor(count_u * max_count).clamp(max=max_count - 1)  # uniform over 1..max_count
    area = height * width / count.double()[:, None, None]  # [B, 1, 1], each box's share of the area
    target = area * (min_area + (max_area - min_area) * box_u[:, :, 0].double())
    log_lo, log_hi = math.log(min_aspect), math.log(1 / min_aspect)
    aspect = torch.exp(log_lo + (log_hi - log_lo) * box_u[:, :, 1].double())
    h = torch.round(torch.sqrt(target * aspect))
    w = torch.round(torch.sqrt(target / aspect))
    fits = (h < height) & (w < width)  # [B, K, 10]
    first = fits.to(torch.int8).argmax(dim=2, keepdim=True)
    h, w = h.gather(2, first)[..., 0], w.gather(2, first)[..., 0]  # [B, K]
    top = torch.floor(box_u[:, :, 2].gather(2, first)[..., 0].double() * (height - h + 1)).clamp(max=height - h)
    left = torch.floor(box_u[:, :, 3].gather(2, first)[..., 0].double() * (width - w + 1)).clamp(max=width - w)
    ks = torch.arange(max_count)
    active = fits.any(dim=2) & (apply_u < probability)[:, None] & (ks[None, :] < count[:, None])  # [B, K]
    if not bool(active.any()):
        return x
    out = x.clone()
    rows = torch.arange(height, dtype=torch.float64).view(1, 1, height, 1)
    cols = torch.arange(width, dtype=torch.float64).view(1, 1, 1, width)
    in_rows = (rows >= top[..., None, None]) & (rows < (top + h)[..., None, None])
    in_cols = (cols >= left[..., None, None]) & (cols < (left + w)[..., None, None])
    inside = in_rows & in_cols & active[..., None, None]  # [B, K, H, W]
    for k in range(max_count):  # later boxes are drawn over earlier ones, as in timm's loop
        m = inside[:, k, None].to(x.device)
        out = torch.where(m, noise[:, k].to(device=x.device, dtype=x.dtype).expand_as(x), out)
    return out
