"""Batched image augmentations on uint8 tensors.

The pretraining augmentations run on a whole collated batch with tensor ops instead of per-image
PIL transforms: one ``affine_grid`` + ``grid_sample`` realises every random resized crop (and
flip) of a crop set, colour ops are vectorised over samples, the blur is one grouped convolution.
That is what makes DINO-style multi-crop affordable on a 2-core CPU, and it runs unchanged on a
GPU if the batch is moved there first.

Randomness: every random parameter is drawn per sample, in a fixed order and a fixed amount,
from the ``torch.Generator`` passed in (on the CPU, then moved to the images' device). So the same
generator seed gives bitwise identical crops, whatever the worker or process that computes them
(:mod:`vfm.data.collate` seeds one generator per batch).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from vfm.data import photometric as P
from vfm.data.crops import resized_crops, sample_crop_boxes

__all__ = ["MultiCropAugmentation", "normalize"]

# DINO's blur radii are pixels of a 224-px global crop; we rescale them to the actual resolution.
_REFERENCE_SIZE = 224


def normalize(images: Tensor, mean: Sequence[float], std: Sequence[float], *, crop_size: int | None = None) -> Tensor:
    """uint8 images ``[..., C, H, W]`` -> float32 ``(x / 255 - mean) / std`` (the evaluation path).

    ``mean``/``std`` have ``C`` entries, or one that applies to every channel. With ``crop_size``
    the centre ``crop_size`` square is taken first (e.g. an ImageFolder ``train`` split stored at
    ``load_size`` fed to a model that expects ``img_size``); smaller images are an error.
    """
    if images.dtype != torch.uint8:
        raise ValueError(f"normalize expects uint8 images, got {images.dtype}")
    if images.ndim < 3:
        raise ValueError(f"normalize expects images [..., C, H, W], got shape {tuple(images.shape)}")
    if crop_size is not None:
        h, w = images.shape[-2:]
        if crop_size > h or crop_size > w:
            raise ValueError(f"normalize: crop_size={crop_size} is larger than the images ({h}x{w})")
        top, left = (h - crop_size) // 2, (w - crop_size) // 2
        images = images[..., top : top + crop_size, left : left + crop_size]
    mean_t, std_t = _stats_tensors(mean, std, images.shape[-3], images.device)
    return (images.to(torch.float32) / 255.0 - mean_t) / std_t


def _stats_tensors(
    mean: Sequence[float], std: Sequence[float], channels: int, device: torch.device
) -> tuple[Tensor, Tensor]:
    if len(mean) != len(std):
        raise ValueError(f"mean and std must have the same length, got {len(mean)} and {len(std)}")
    if len(mean) not in (1, channels):
        raise ValueError(f"mean/std have {len(mean)} values but the images have {channels} channels")
    mean_t = torch.tensor([float(m) for m in mean], dtype=torch.float32, device=device).view(-1, 1, 1)
    std_t = torch.tensor([float(s) for s in std], dtype=torch.float32, device=device).view(-1, 1, 1)
    return mean_t, std_t


def _check_prob(name: str, p: float) -> None:
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"MultiCropAugmentation: {name} must be a probability in [0, 1], got {p}")


def _check_scale(name: str, scale: Sequence[float]) -> tuple[float, float]:
    if len(scale) != 2 or not 0.0 < scale[0] <= scale[1] <= 1.0:
        raise ValueError(
            f"MultiCropAugmentation: {name} must be (min, max) with 0 < min <= max <= 1, got {tuple(scale)}"
        )
    return float(scale[0]), float(scale[1])


class MultiCropAugmentation:
    """DINO's multi-crop augmentation, on a whole uint8 batch at once.

    Follows ``DataAugmentationDINO`` of Caron et al. 2021, "Emerging Properties in
    Self-Supervised Vision Transformers" (facebookresearch/dino, ``main_dino.py``): per crop,
    RandomResizedCrop -> horizontal flip -> colour jitter (applied with ``color_jitter_p``, the
    four ops in a random order) -> random grayscale -> Gaussian blur -> solarization ->
    normalisation. The two global crops are asymmetric: the first is always blurred, the second
    rarely blurred and sometimes solarized; local crops are blurred half the time. With
    ``n_global > 2`` the extra global crops alternate between those two recipes.

    Differences from the per-image PIL pipeline, all deliberate:

    * The crop is realised by ``grid_sample`` without antialiasing, ``interpolation="bicubic"``
      as in the official recipes (DINO, iBOT, DINOv2, MAE, BEiT and DeiT all build
      ``RandomResizedCrop(..., interpolation=BICUBIC)``; open_clip too) or ``"bilinear"``.
      Crop boxes are sampled exactly as torchvision's ``RandomResizedCrop.get_params`` does (area
      fraction uniform in ``scale``, aspect ratio log-uniform in [3/4, 4/3], 10 tries, then a
      centre-crop fallback) on each image's own height and width, so only the resampling filter
      differs (PIL antialiases when a crop is downscaled), and bicubic overshoot is clipped to
      [0, 1] as PIL clips it to [0, 255].
    * Images of different sizes come as one canvas ``[B, C, H, W]`` plus ``sizes`` (each image's
      ``(h, w)`` at the top left, the rest of the canvas filled by repeating its last row and
      column, see :func:`vfm.data.collate.stack_images`): boxes are drawn relative to the whole
      image, never the canvas.
    * Gaussian blur uses an exact separable Gaussian (radius ``ceil(3 sigma)``, reflect padding)
      instead of PIL's box approximation. ``blur_sigma`` is in pixels *of a 224-px global crop*,
      as in DINO, and is multiplied by ``global_crop_size / 224`` for every crop of the set: at
      224 this is exactly DINO (locals included), while 28-px images are not blurred out.
    * Single-channel images ("adapted for grayscale"): brightness and contrast apply; saturation,
      hue and random grayscale are no-ops, as in torchvision for 1-channel tensors.

    Random parameters come from ``generator`` in a fixed order and amount, so a given seed gives
    bitwise identical output regardless of which probabilities fire.
    """

    def __init__(
        self,
        *,
        global_crop_size: int,
        local_crop_size: int,
        n_global: int = 2,
        n_local: int = 6,
        global_scale: tuple[float, float] = (0.4, 1.0),
        local_scale: tuple[float, float] = (0.05, 0.4),
        mean: Sequence[float],
        std: Sequence[float],
        flip_p: float = 0.5,
        color_jitter_p: float = 0.8,
        brightness: float = 0.4,
        contrast: float = 0.4,
        saturation: float = 0.2,
        hue: float = 0.1,
        grayscale_p: float = 0.2,
        blur_p: tuple[float, float, float] = (1.0, 0.1, 0.5),
        blur_sigma: tuple[float, float] = (0.1, 2.0),
        solarize_p: tuple[float, float, float] = (0.0, 0.2, 0.0),
        interpolation: str = "bicubic",
    ) -> None:
        if interpolation not in ("bicubic", "bilinear"):
            raise ValueError(f"MultiCropAugmentation: interpolation must be 'bicubic' or 'bilinear', got {interpolation!r}")
        if global_crop_size < 1 or local_crop_size < 1:
            raise ValueError(
                f"MultiCropAugmentation: crop sizes must be positive, got global={global_crop_size}, local={local_crop_size}"
            )
        if n_global < 1 or n_local < 0:
            raise ValueError(f"MultiCropAugmentation: need n_global >= 1 and n_local >= 0, got {n_global}, {n_local}")
        self.global_scale = _check_scale("global_scale", global_scale)
        self.local_scale = _check_scale("local_scale", local_scale)
        if len(mean) != len(std) or len(mean) == 0:
            raise ValueError(
                f"MultiCropAugmentation: mean and std must have the same non-zero length, got {len(mean)} and {len(std)}"
            )
        if any(float(s) <= 0 for s in std):
            raise ValueError(f"MultiCropAugmentation: std must be positive, got {list(std)}")
        for name, p in (("flip_p", flip_p), ("color_jitter_p", color_jitter_p), ("grayscale_p", grayscale_p)):
            _check_prob(name, p)
        for name, ps in (("blur_p", blur_p), ("solarize_p", solarize_p)):
            if len(ps) != 3:
                raise ValueError(
                    f"MultiCropAugmentation: {name} needs 3 probabilities (global 1, global 2, local), got {tuple(ps)}"
                )
            for p in ps:
                _check_prob(name, p)
        for name, v in (("brightness", brightness), ("contrast", contrast), ("saturation", saturation)):
            if v < 0:
                raise ValueError(f"MultiCropAugmentation: {name} must be >= 0, got {v}")
        if not 0.0 <= hue <= 0.5:
            raise ValueError(f"MultiCropAugmentation: hue must be in [0, 0.5], got {hue}")
        if len(blur_sigma) != 2 or not 0.0 < blur_sigma[0] <= blur_sigma[1]:
            raise ValueError(
                f"MultiCropAugmentation: blur_sigma must be (min, max) with 0 < min <= max, got {tuple(blur_sigma)}"
            )

        self.global_crop_size = int(global_crop_size)
        self.local_crop_size = int(local_crop_size)
        self.n_global = int(n_global)
        self.n_local = int(n_local)
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)
        self.flip_p = float(flip_p)
        self.color_jitter_p = float(color_jitter_p)
        self.brightness = float(brightness)
        self.contrast = float(contrast)
        self.saturation = float(saturation)
        self.hue = float(hue)
        self.grayscale_p = float(grayscale_p)
        self.blur_p = tuple(float(p) for p in blur_p)
        self.solarize_p = tuple(float(p) for p in solarize_p)
        self.blur_sigma = (float(blur_sigma[0]), float(blur_sigma[1]))
        self.sigma_scale = self.global_crop_size / _REFERENCE_SIZE
        self.interpolation = interpolation

    def __repr__(self) -> str:
        return (
            f"MultiCropAugmentation(global={self.n_global}x{self.global_crop_size} scale={self.global_scale}, "
            f"local={self.n_local}x{self.local_crop_size} scale={self.local_scale})"
        )

    # ----------------------------------------------------------------------------------------

    def __call__(
        self,
        images: Tensor,
        generator: torch.Generator | None = None,
        *,
        of_batch: int | None = None,
        start: int = 0,
        sizes: Sequence[Sequence[int]] | None = None,
        normalize: bool = True,
    ) -> list[Tensor]:
        """uint8 ``[B, C, H, W]`` -> ``n_global`` float32 ``[B, C, g, g]`` then ``n_local`` ``[B, C, l, l]``.

        ``sizes``: each image's ``(h, w)`` when ``images`` is a canvas of images of different
        sizes (each at the top left); None: every image fills ``H x W``. ``normalize=False``
        returns the views in [0, 1], before the mean/std normalisation.

        ``of_batch`` / ``start``: ``images`` are rows ``start .. start + B`` of a batch of
        ``of_batch`` images (e.g. one process's shard of a data-parallel global batch). The random
        parameters are drawn for the whole batch, from the same stream as augmenting all of it,
        and only these rows are computed, so the shard comes out exactly as those rows of the
        whole batch would.
        """
        if images.dtype != torch.uint8 or images.ndim != 4:
            raise ValueError(
                f"MultiCropAugmentation expects uint8 images [B, C, H, W], got {images.dtype} {tuple(images.shape)}"
            )
        total = len(images) if of_batch is None else int(of_batch)
        if start < 0 or start + len(images) > total:
            raise ValueError(
                f"MultiCropAugmentation: rows {start}..{start + len(images)} do not fit in a batch of {total}"
            )
        rows = slice(start, start + len(images))
        if sizes is not None and len(sizes) != len(images):
            raise ValueError(f"MultiCropAugmentation: {len(sizes)} sizes for {len(images)} images")
        mean_t, std_t = _stats_tensors(self.mean, self.std, images.shape[1], images.device)
        x = images.to(torch.float32) / 255.0
        crops = []
        for k in range(self.n_global + self.n_local):
            if k < self.n_global:
                recipe = k % 2  # global 1 / global 2 recipes, alternating for extra globals
                size, scale = self.global_crop_size, self.global_scale
            else:
                recipe = 2
                size, scale = self.local_crop_size, self.local_scale
            view = self._one_view(x, size, scale, self.blur_p[recipe], self.solarize_p[recipe], generator, total, rows,
                                  sizes)
            crops.append((view - mean_t) / std_t if normalize else view)
        return crops

    def _one_view(
        self,
        x: Tensor,
        size: int,
        scale: tuple[float, float],
        blur_p: float,
        solarize_p: float,
        g: torch.Generator | None,
        total: int | None = None,
        rows: slice | None = None,
        sizes: Sequence[Sequence[int]] | None = None,
    ) -> Tensor:
        b, c, height, width = x.shape
        dev = x.device
        n = b if total is None else total
        sel = slice(0, b) if rows is None else rows
        # Fixed draw order and count, independent of which augmentations fire. Everything is
        # drawn and decided on the CPU (so the stream does not depend on the device and the
        # "does any sample need this op" tests do not synchronise a GPU); only the selected
        # indices and their factors travel to the images' device. Drawn for all ``n`` rows of
        # the batch, then cut to ours (``sel``): a shard gets exactly its rows' parameters.
        crop_u = torch.rand(n, 4, 10, generator=g)[sel]  # area, log-ratio, top, left, per try
        flip_u = torch.rand(n, generator=g)[sel]
        jitter_u = torch.rand(n, generator=g)[sel]
        factor_u = torch.rand(n, 4, generator=g)[sel]
        order = torch.rand(n, 4, generator=g).argsort(dim=1)[sel]  # random op order per sample
        gray_u = torch.rand(n, generator=g)[sel]
        blur_u = torch.rand(n, generator=g)[sel]
        sigma_u = torch.rand(n, generator=g)[sel]
        solar_u = torch.rand(n, generator=g)[sel]
        if b == 0:
            return x.new_zeros(0, c, size, size)

        # 1. RandomResizedCrop + horizontal flip: one affine resampling.
        if sizes is None:
            top, left, h, w = sample_crop_boxes(crop_u, height, width, scale)
        else:
            hw = torch.tensor([[int(v) for v in s] for s in sizes], dtype=torch.float64)
            top, left, h, w = sample_crop_boxes(crop_u, hw[:, 0:1], hw[:, 1:2], scale)
        out = resized_crops(x, (top, left, h, w), flip_u < self.flip_p, size, self.interpolation)

        # 2. Colour jitter (torchvision ColorJitter semantics), p = color_jitter_p.
        jitter = jitter_u < self.color_jitter_p
        if jitter.any():
            out = self._color_jitter(out, jitter, factor_u, order)

        # 3. Random grayscale (kept C channels); a no-op on 1-channel images.
        gray = gray_u < self.grayscale_p
        if c == 3 and gray.any():
            idx = gray.nonzero().squeeze(1).to(dev)
            out[idx] = P.grayscale(out[idx]).expand(-1, 3, -1, -1)

        # 4. Gaussian blur with a per-sample sigma.
        blur = blur_u < blur_p
        if blur.any():
            idx = blur.nonzero().squeeze(1)
            lo, hi = self.blur_sigma
            sigma = (lo + (hi - lo) * sigma_u[idx]) * self.sigma_scale
            idx = idx.to(dev)
            out[idx] = P.gaussian_blur(out[idx], sigma)

        # 5. Solarization, PIL ImageOps.solarize(threshold=128) on [0, 1].
        solar = solar_u < solarize_p
        if solar.any():
            idx = solar.nonzero().squeeze(1).to(dev)
            out[idx] = P.solarize(out[idx])
        return out

    def _color_jitter(self, x: Tensor, apply: Tensor, u: Tensor, order: Tensor) -> Tensor:
        """Per-sample ColorJitter: factors b, c, s ~ U[max(0, 1 - v), 1 + v], hue ~ U[-h, h], ops in ``order``."""

        def factor(col: int, v: float) -> Tensor:
            lo = max(0.0, 1.0 - v)
            return lo + (1.0 + v - lo) * u[:, col]

        factors = [
            factor(0, self.brightness),
            factor(1, self.contrast),
            factor(2, self.saturation),
            (2 * u[:, 3] - 1) * self.hue,
        ]
        strengths = [self.brightness, self.contrast, self.saturation, self.hue]
        ops = [P.adjust_brightness, P.adjust_contrast, P.adjust_saturation, P.adjust_hue]
        rgb = x.shape[1] == 3
        for pos in range(4):
            for op in range(4):
                # Saturation/hue need colour; skip ops with zero strength (identity, but the HSV
                # round-trip of hue would still perturb the last bits).
                if strengths[op] == 0 or (op >= 2 and not rgb):
                    continue
                sel = apply & (order[:, pos] == op)
                if sel.any():
                    idx = sel.nonzero().squeeze(1)
                    f = factors[op][idx].to(x.device)
                    idx = idx.to(x.device)
                    x[idx] = ops[op](x[idx], f)
        return x
