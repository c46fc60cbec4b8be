"""A generated, learnable data set for tests and smoke runs: class-specific gratings (:func:`synthetic`)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from vfm.data.datasets.core import DataSplits, TensorImageDataset, norm_stats

__all__ = ["synthetic"]

def _synthetic_images(labels: Tensor, *, img_size: int, in_chans: int, num_classes: int, g: torch.Generator) -> Tensor:
    """Class-specific gratings under a Gaussian window at a random position, plus noise.

    Class ``c`` is an (orientation, frequency) pair: ``c % n_orient`` picks an angle in
    [0, 90] degrees and ``c // n_orient`` a spatial frequency. Angles stay within [0, 90] so a
    horizontal flip (which maps angle a to 180 - a) never turns one class into another — the
    pretraining augmentations keep the classes distinguishable. Phase, window position,
    contrast, brightness, tint and noise are random per image, so raw pixels are not a
    shortcut: a model has to learn orientation/frequency features.
    """
    n = labels.shape[0]
    n_orient = min(num_classes, 4)
    orient = (labels % n_orient).float()
    freq_idx = (labels // n_orient).float()
    angle = orient * (math.pi / 2) / max(n_orient - 1, 1)
    n_freq = math.ceil(num_classes / n_orient)
    # Cycles per image from ~2 up to a third of Nyquist, so every frequency survives resizing.
    top = max(2.0 + n_freq, img_size / 6)
    cycles = 2.0 + freq_idx * (top - 2.0) / max(n_freq - 1, 1)

    phase = torch.rand(n, generator=g) * 2 * math.pi
    center = (torch.rand(n, 2, generator=g) * 0.5 + 0.25) * img_size
    contrast = torch.rand(n, generator=g) * 0.4 + 0.6
    brightness = torch.rand(n, generator=g) * 0.3 + 0.35
    tint = torch.rand(n, in_chans, generator=g) * 0.5 + 0.5 if in_chans > 1 else torch.ones(n, 1)
    noise = torch.randn(n, in_chans, img_size, img_size, generator=g) * 0.06

    coords = torch.arange(img_size, dtype=torch.float32) + 0.5
    y, x = coords[:, None], coords[None, :]  # [S,1], [1,S]
    a = angle[:, None, None]
    proj = x * torch.cos(a) + y * torch.sin(a)  # [N,S,S]
    wave = torch.cos(2 * math.pi * cycles[:, None, None] * proj / img_size + phase[:, None, None])
    dist2 = (x - center[:, 0, None, None]) ** 2 + (y - center[:, 1, None, None]) ** 2
    window = torch.exp(-dist2 / (2 * (0.35 * img_size) ** 2))
    gray = brightness[:, None, None] + 0.5 * contrast[:, None, None] * window * wave  # [N,S,S]
    img = gray[:, None] * tint[:, :, None, None] + noise
    return (img.clamp(0, 1) * 255).round().to(torch.uint8)


def synthetic(
    *,
    num_train: int = 512,
    num_val: int = 128,
    num_test: int = 128,
    img_size: int = 28,
    in_chans: int = 1,
    num_classes: int = 4,
    seed: int = 0,
    mean: Sequence[float] = (0.5,),
    std: Sequence[float] = (0.25,),
) -> DataSplits:
    """A deterministic, generated, genuinely learnable dataset for tests and smoke runs (milliseconds).

    Each class is an oriented grating of a class-specific frequency at a random position with
    random phase and noise (see :func:`_synthetic_images`); classes are balanced. The same
    arguments always give bitwise the same images. ``num_val``/``num_test`` of 0 give None.
    """
    if num_train <= 0 or num_val < 0 or num_test < 0:
        raise ValueError(
            f"dataset sizes must be num_train > 0, num_val >= 0, num_test >= 0; got {num_train}, {num_val}, {num_test}"
        )
    if num_classes < 1:
        raise ValueError(f"dataset.num_classes must be >= 1, got {num_classes}")
    if img_size < 4:
        raise ValueError(f"dataset.img_size must be >= 4, got {img_size}")
    if in_chans < 1:
        raise ValueError(f"dataset.in_chans must be >= 1, got {in_chans}")
    mean_t, std_t = norm_stats(mean, std, in_chans)
    g = torch.Generator().manual_seed(seed)
    splits: list[TensorImageDataset | None] = []
    for n in (num_train, num_val, num_test):
        if n == 0:
            splits.append(None)
            continue
        # Balanced classes in a seeded random order.
        labels = (torch.arange(n) % num_classes)[torch.randperm(n, generator=g)]
        images = _synthetic_images(labels, img_size=img_size, in_chans=in_chans, num_classes=num_classes, g=g)
        splits.append(TensorImageDataset(images, labels))
    train, val, test = splits
    assert train is not None
    return DataSplits(train=train, val=val, test=test, img_size=img_size, in_chans=in_chans, mean=mean_t,
                      std=std_t, num_classes=num_classes,
                      class_names=[f"class_{i}" for i in range(num_classes)])
