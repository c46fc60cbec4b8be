"""Training collates: a list of seeded samples in, one :class:`~vfm.data.batch.Batch` out.

Every collate derives from :class:`Collate`. It stacks the uint8 images of a batch from
:class:`~vfm.data.sampler.SeededBatchSampler` and augments them with a generator seeded by the
batch seed (see :mod:`vfm.data.sampler`), so a batch is the same whatever worker builds it.

Augmenting on the training device. Ten float crops per image are a lot of work for a few CPU
workers and a lot of bytes to copy to a GPU. ``collate.deferred()`` is a copy of a training collate
whose workers only decode, stack (and run what must stay on the CPU: tokenization, PIL
RandAugment); its batches carry the uint8 ``"images"`` and the batch ``"seed"`` instead of
``"crops"``. Once the batch is on the device, ``collate.finish(batch)`` re-seeds the same CPU
generator and runs the augmentation (and masks, Mixup/CutMix) there, so the result is the batch
the plain collate would have built, on that device: bitwise on the CPU, with the same random
parameters on a GPU. ``finish`` returns a batch that is not deferred unchanged, so a training loop
can call it unconditionally; ``trainer.augment_on_device`` is the option that turns this on.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping, Sequence
from typing import Any, ClassVar, TypeVar

import numpy as np
import torch
from torch import Tensor

from vfm.data.batch import Batch
from vfm.data.erasing import random_erasing
from vfm.data.transforms import MultiCropAugmentation, normalize
from vfm.rng import global_rng, global_rng_state

__all__ = ["Collate", "ImageTextCollate", "MultiCropCollate", "SupervisedCollate", "stack_images"]

# Random erasing draws from its own generator (seed XOR this), so the crops keep their stream.
_ERASING_SALT = 0x5EED_E8A5E


def stack_images(images: Sequence[Tensor]) -> tuple[Tensor, list[tuple[int, int]] | None]:
    """uint8 images ``[C, h_i, w_i]`` -> one batch ``[B, C, H, W]`` and each image's ``(h, w)``.

    Images of one size are stacked as they are (sizes None). Otherwise each goes to the top left of
    an ``H x W`` canvas (the largest height and width) whose rest repeats the image's last column
    and row, so a crop box touching the image's edge resamples the edge, as at the canvas border.
    """
    if len({tuple(im.shape) for im in images}) <= 1:
        return torch.stack(list(images)), None
    sizes = [(int(im.shape[-2]), int(im.shape[-1])) for im in images]
    height, width = max(h for h, _ in sizes), max(w for _, w in sizes)
    canvas = images[0].new_empty((len(images), images[0].shape[0], height, width))
    for out, im, (h, w) in zip(canvas, images, sizes):
        out[:, :h, :w] = im
        out[:, :h, w:] = im[:, :, w - 1 : w]
        out[:, h:, :] = out[:, h - 1 : h, :]
    return canvas, sizes


def _batch_seed_of(samples: Sequence[tuple[Any, ...]], who: str, fields: str) -> int:
    """The seed shared by all samples of a batch (``fields`` names the expected tuple, seed last)."""
    arity = fields.count(",") + 1
    if not samples or any(len(s) != arity for s in samples):
        got = len(samples[0]) if samples else 0
        raise ValueError(
            f"{who} expects {fields} samples from SeededDataset + SeededBatchSampler, got {got}-tuples "
            "(use vfm.data.loader.build_train_loader on a dataset of the matching kind)"
        )
    seed = samples[0][-1]
    if any(s[-1] != seed for s in samples):
        raise ValueError(
            f"{who}: the samples of one batch carry different seeds; batches must come from SeededBatchSampler"
        )
    return int(seed)


def _stack_samples(samples: Sequence[tuple[Any, ...]], who: str) -> tuple[Tensor, Tensor, int, Batch]:
    """uint8 images ``[B,C,H,W]``, int64 labels ``[B]``, the batch seed of seeded samples and
    ``{"sizes": ...}`` when the images differ in size (:func:`stack_images`), else ``{}``.
    An image-text sample's caption is dropped: an image-only method trains on its image."""
    samples = [(s[0], s[2], s[3]) if len(s) == 4 else s for s in samples]  # (image, caption, label, seed)
    seed = _batch_seed_of(samples, who, "(image, label, seed)")
    images, sizes = stack_images([s[0] for s in samples])
    labels = torch.tensor([int(s[1]) for s in samples], dtype=torch.int64)
    return images, labels, seed, ({} if sizes is None else {"sizes": sizes})


def _augment(augment: Callable[..., list[Tensor]], images: Tensor, generator: torch.Generator, batch: Batch,
             **kwargs: Any) -> list[Tensor]:
    """``augment(images, generator)``, told each image's size when they differ (``batch["sizes"]``)."""
    if "sizes" in batch:
        kwargs["sizes"] = batch["sizes"]
    return augment(images, generator, **kwargs)


def _is_deferred_batch(batch: Any) -> bool:
    return isinstance(batch, Mapping) and "images" in batch and "seed" in batch


def _to_device(x: Any, device: torch.device) -> Any:
    """Tensors (also in dicts) onto ``device``; a no-op for what the training loop already moved."""
    if isinstance(x, Tensor):
        return x.to(device)
    if isinstance(x, dict):
        return {k: _to_device(v, device) for k, v in x.items()}
    return x


_C = TypeVar("_C", bound="Collate")


class Collate:
    """Base of the training collates: ``collate(samples) -> Batch``, plus ``deferred()`` /
    ``finish()`` (see the module docstring), so the trainer calls them without probing.

    A subclass builds the deferred batch in ``_deferred_batch`` (cheap, CPU-only work) and the rest
    in ``_finish``; the plain ``__call__`` is the two in a row, so the deferred path cannot drift
    from it. A collate that cannot split its work that way overrides ``__call__`` and sets
    ``can_defer = False``: its ``deferred()`` then raises, naming the option to turn off.
    """

    #: Whether ``deferred()`` works (``trainer.augment_on_device=true`` needs it).
    can_defer: ClassVar[bool] = True
    #: How often each image appears per global batch (repeated augmentation, DeiT's ``RASampler``);
    #: the training loader's sampler reads it (:mod:`vfm.data.sampler`). 1: every image once.
    repeats: int = 1
    # A class attribute, so collates pickled before deferral existed unpickle as not deferred.
    _deferred: bool = False

    def _deferred_batch(self, samples: Sequence[tuple[Any, ...]]) -> Batch:
        raise NotImplementedError

    def _finish(self, batch: Batch, images: Tensor, seed: int) -> Batch:
        raise NotImplementedError

    def __call__(self, samples: Sequence[tuple[Any, ...]]) -> Batch:
        batch = self._deferred_batch(samples)
        return batch if self._deferred else self.finish(batch)

    @property
    def is_deferred(self) -> bool:
        """Whether ``__call__`` leaves the augmentation to :meth:`finish`."""
        return self._deferred

    def deferred(self: _C) -> _C:
        """A shallow copy whose batches carry uint8 ``"images"`` and the batch ``"seed"`` instead of
        ``"crops"``: the loader workers only decode and stack, :meth:`finish` augments wherever
        the batch has been moved (e.g. the GPU).

        Raises ``ValueError`` (naming ``trainer.augment_on_device``) for a collate that cannot defer.
        """
        if not self.can_defer:
            raise ValueError(
                f"trainer.augment_on_device=true: the collate {type(self).__name__} cannot defer its augmentation "
                "to the device; set trainer.augment_on_device=false"
            )
        twin = copy.copy(self)
        twin._deferred = True
        return twin

    def finish(self, batch: Batch) -> Batch:
        """Complete a deferred batch on the device of its ``"images"``: exactly the batch the plain
        collate would have returned, with every tensor on that device. Any other batch is returned
        unchanged, so a training loop can call this whatever the loader produced.

        The augmentation's random parameters come from a CPU generator seeded with ``"seed"``, as in
        the plain collate, so they do not depend on the device. ``"seed"`` is a Python int (a
        tensor also works, but reading one back from a GPU would synchronise it).
        """
        if not _is_deferred_batch(batch):
            return batch
        rest = dict(batch)
        images = rest.pop("images")
        seed = int(rest.pop("seed"))
        rest = {k: _to_device(v, images.device) for k, v in rest.items()}
        with torch.no_grad():
            return self._finish(rest, images, seed)


class MultiCropCollate(Collate):
    """Collate for multi-crop methods (DINO, iBOT, DINOv2): stack the uint8 images and augment the
    batch with a generator seeded by the batch seed.

    Returns ``{"crops": list of float [B, C, s, s] (globals first), "label": int64 [B]}``, plus
    ``"masks"``: one bool ``[B, N]`` patch mask per global crop when ``masking`` is given (masked
    image modelling, iBOT / DINOv2). ``masking(batch_size=, grid_size=, generator=)`` draws them
    (e.g. a partial of :func:`vfm.data.masking.sample_masks`); the grid is the global crop size
    divided by ``patch_size``. Masks are drawn after the crops from the same per-batch generator,
    so they are reproducible like the augmentation.

    ``deferred()`` returns a copy that yields ``{"images": uint8 [B, C, H, W], "seed": int,
    "label": int64 [B]}``: the workers only stack, and ``finish(batch)``, once the batch is on the
    GPU, draws the crops and masks there (masks are drawn on the CPU and moved), from the same
    seeded generator, so the batch matches the plain collate's.
    """

    def __init__(self, augment: MultiCropAugmentation, masking: Callable | None = None,
                 patch_size: int | None = None) -> None:
        if masking is not None and not patch_size:
            raise ValueError("MultiCropCollate: masking needs the backbone's patch_size")
        self.augment, self.masking, self.patch_size = augment, masking, patch_size

    def _deferred_batch(self, samples: Sequence[tuple[Tensor, int, int]]) -> Batch:
        images, labels, seed, sizes = _stack_samples(samples, "MultiCropCollate")
        return {"images": images, "seed": seed, "label": labels, **sizes}

    def _finish(self, batch: Batch, images: Tensor, seed: int) -> Batch:
        generator = torch.Generator().manual_seed(seed)
        labels = batch["label"]
        out: Batch = {"crops": _augment(self.augment, images, generator, batch), "label": labels}
        if self.masking is not None:
            grid = self.augment.global_crop_size // self.patch_size
            out["masks"] = [
                self.masking(batch_size=len(labels), grid_size=grid, generator=generator).to(images.device)
                for _ in range(self.augment.n_global)
            ]
        return out


class SupervisedCollate(Collate):
    """Collate for supervised pretraining, DeiT's training transform on a batch (timm
    ``create_transform`` as facebookresearch/deit ``datasets.py`` builds it): RandomResizedCrop and
    flip (`augment`, drawn from the batch seed), per-image RandAugment (timm, on the uint8 crops as
    PIL images), normalisation, random erasing (:func:`vfm.data.erasing.random_erasing`), then
    Mixup/CutMix with label smoothing (timm `Mixup`, in DeiT's training loop).

    timm draws from Python's `random` and NumPy's global generators; both are seeded from the batch
    seed inside a saved-and-restored state, so the batch is reproducible and independent of
    `num_workers`, and the training process's own random streams are untouched.
    Returns ``{"crops": [float [B, C, s, s]], "label": int64 [B], "target": float [B, K]}``.

    ``repeats`` is the repeated augmentation of DeiT's ``RASampler`` (each image ``repeats`` times
    per global batch, see :mod:`vfm.data.sampler`); the training loader reads it from here.

    ``deferred()`` returns a copy whose workers crop, flip and RandAugment (PIL, CPU only) and yield
    ``{"images": uint8 [B, C, s, s] (the augmented crops), "seed": int, "label": int64 [B]}``,
    plus ``"mix_rng"`` with Mixup/CutMix: the Python and NumPy global generator states that
    RandAugment left, which Mixup continues from in the plain collate. ``finish(batch)``
    normalises, erases, mixes and builds the soft targets on the batch's device. Without
    RandAugment the crop itself waits for ``finish``, as in the other collates.
    """

    def __init__(self, augment: MultiCropAugmentation, *, num_classes: int, label_smoothing: float = 0.1,
                 mixup: float = 0.8, cutmix: float = 1.0, mixup_prob: float = 1.0, mixup_switch_prob: float = 0.5,
                 randaugment: str | None = "rand-m9-mstd0.5-inc1-mmax9", erasing: float = 0.25,
                 erasing_mode: str = "pixel", erasing_count: int = 1, repeats: int = 1) -> None:
        from timm.data import Mixup, rand_augment_transform
        from timm.data.transforms import str_to_pil_interp

        self.augment, self.num_classes, self.label_smoothing = augment, num_classes, label_smoothing
        self.erasing, self.erasing_mode, self.erasing_count = float(erasing), erasing_mode, int(erasing_count)
        self.repeats = int(repeats)
        self.mixup = None
        if mixup > 0 or cutmix > 0:
            self.mixup = Mixup(mixup_alpha=mixup, cutmix_alpha=cutmix, prob=mixup_prob, switch_prob=mixup_switch_prob,
                               label_smoothing=label_smoothing, num_classes=num_classes)
        self.randaugment = None
        if randaugment:
            # as timm's transforms_imagenet_train: img_mean is the fill colour of geometric ops (the
            # dataset mean in 0-255), interpolation the crop's (DeiT: bicubic)
            fill = tuple(min(255, round(255 * m)) for m in augment.mean)
            hparams = {"translate_const": int(augment.global_crop_size * 0.45), "img_mean": fill,
                       "interpolation": str_to_pil_interp(getattr(augment, "interpolation", "bicubic"))}
            self.randaugment = rand_augment_transform(randaugment, hparams)

    def _crop(self, images: Tensor, seed: int, batch: Batch, normalize: bool) -> Tensor:
        """RandomResizedCrop + flip of every image (the only view of `augment`), from the batch seed."""
        return _augment(self.augment, images, torch.Generator().manual_seed(seed), batch, normalize=normalize)[0]

    def _deferred_batch(self, samples: Sequence[tuple[Tensor, int, int]]) -> Batch:
        from PIL import Image

        images, labels, seed, sizes = _stack_samples(samples, "SupervisedCollate")
        if self.mixup is not None and len(labels) % 2:
            raise ValueError(f"Mixup needs an even per-process batch size, got {len(labels)}")
        batch: Batch = {"seed": seed, "label": labels, **sizes}
        with global_rng(seed=seed):
            if self.randaugment is not None:
                # RandAugment sees the crop, as in timm's transform (crop, flip, RandAugment, ...)
                crops = self._crop(images, seed, batch, normalize=False).mul_(255).round_().to(torch.uint8)
                out = []
                for img in crops:
                    arr = img.permute(1, 2, 0).numpy()
                    pil = Image.fromarray(arr[..., 0] if arr.shape[-1] == 1 else arr)
                    res = np.asarray(self.randaugment(pil))
                    out.append(torch.from_numpy(res.copy()).reshape(arr.shape).permute(2, 0, 1))
                images = torch.stack(out)
                batch.pop("sizes", None)  # cropped: every image is now s x s
            if self.mixup is not None:
                batch["mix_rng"] = global_rng_state()
        batch["images"] = images
        return batch

    def _finish(self, batch: Batch, images: Tensor, seed: int) -> Batch:
        labels = batch["label"]
        if self.randaugment is not None:  # already cropped and RandAugmented in the workers
            x = normalize(images, self.augment.mean, self.augment.std)
        else:
            x = self._crop(images, seed, batch, normalize=True)
        if self.erasing > 0:  # after normalisation, as timm's RandomErasing (N(0, 1) is the mean +- std)
            x = random_erasing(x, torch.Generator().manual_seed(seed ^ _ERASING_SALT), probability=self.erasing,
                               mode=self.erasing_mode, max_count=self.erasing_count)
        if self.mixup is not None:
            with global_rng(state=batch["mix_rng"]):
                x, target = self.mixup(x, labels)
        else:
            n, k, eps = len(labels), self.num_classes, self.label_smoothing
            target = torch.full((n, k), eps / k, device=labels.device)
            target.scatter_(1, labels[:, None], 1.0 - eps + eps / k)
        return {"crops": [x], "label": labels, "target": target}


class ImageTextCollate(Collate):
    """Collate for image–text methods (CLIP): stack the uint8 images, augment the batch with a
    generator seeded by the batch seed, and tokenize the captions.

    Samples are ``(image, caption, label, seed)`` (an image–text dataset of
    :mod:`vfm.data.image_text` behind :func:`build_train_loader`). ``augment`` is usually a
    :class:`~vfm.data.transforms.MultiCropAugmentation` with ``n_global=1, n_local=0`` (CLIP's
    single random resized crop); its list of crops is kept as is. ``tokenizer`` is any callable
    ``list[str] -> Tensor`` (token ids ``[B, L]``) or ``-> dict`` of tensors (ids, attention mask);
    it runs here, in the loader workers, so tokenization overlaps training.

    Returns ``{"crops": list of float [B, C, s, s], "text": tokenizer(captions), "captions":
    list[str], "label": int64 [B]}`` (label -1 where unknown).

    ``deferred()`` returns a copy that still tokenizes in the workers but yields ``{"images": uint8
    [B, C, H, W], "seed": int, "text", "captions", "label"}``; ``finish(batch)`` augments on the
    batch's device (``augment`` must then accept images there, as ``MultiCropAugmentation`` does).
    """

    def __init__(
        self,
        augment: Callable[[Tensor, torch.Generator], list[Tensor]],
        tokenizer: Callable[[list[str]], Tensor | dict[str, Tensor]],
    ) -> None:
        if not callable(augment) or not callable(tokenizer):
            raise TypeError("ImageTextCollate: augment and tokenizer must both be callables")
        self.augment, self.tokenizer = augment, tokenizer

    def _deferred_batch(self, samples: Sequence[tuple[Tensor, str, int, int]]) -> Batch:
        seed = _batch_seed_of(samples, "ImageTextCollate", "(image, caption, label, seed)")
        captions = [s[1] for s in samples]
        if not all(isinstance(c, str) for c in captions):
            kinds = sorted({type(c).__name__ for c in captions})
            raise TypeError(
                f"ImageTextCollate: captions must be str, got {kinds}; is the training set an image–text dataset "
                "(vfm.data.image_text, e.g. dataset=fashion_mnist_captions)?"
            )
        images, sizes = stack_images([s[0] for s in samples])
        labels = torch.tensor([int(s[2]) for s in samples], dtype=torch.int64)
        text = self.tokenizer(captions)
        if not isinstance(text, Tensor) and not (
            isinstance(text, dict) and all(isinstance(v, Tensor) for v in text.values())
        ):
            raise TypeError(
                f"ImageTextCollate: the tokenizer must return a Tensor or a dict of Tensors, got {type(text).__name__}"
            )
        batch: Batch = {"images": images, "seed": seed, "text": text, "captions": captions, "label": labels}
        if sizes is not None:
            batch["sizes"] = sizes
        return batch

    def _finish(self, batch: Batch, images: Tensor, seed: int) -> Batch:
        generator = torch.Generator().manual_seed(seed)
        crops = _augment(self.augment, images, generator, batch)
        return {"crops": crops, "text": batch["text"], "captions": batch["captions"], "label": batch["label"]}
