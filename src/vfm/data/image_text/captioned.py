"""Captions from labels: a labelled dataset as image–text pairs, through caption templates
("a photo of a {}."), optionally holding out classes for zero-shot experiments."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import Dataset

from vfm.data.datasets import DataSplits, benchmark, synthetic
from vfm.data.image_text.checks import yields_captions
from vfm.data.prompts import CAPTION_TEMPLATES, FASHION_MNIST_CLASS_NAMES_NATURAL

__all__ = ["CaptionedDataset", "captioned", "synthetic_captions"]

_MASK64 = (1 << 64) - 1


def _mix64(x: int) -> int:
    """splitmix64's finaliser: a cheap, well-mixed, platform-independent integer hash."""
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


class CaptionedDataset(Dataset):
    """A labelled dataset of ``(image, label)`` as image–text pairs ``(image, caption, label)``.

    ``caption = templates[t].format(class_names[label])``, where ``t`` is a hash of ``(seed, i)``
    with ``i`` the index in the *wrapped* dataset: the same sample gets the same caption in every
    epoch, process and resume, and the caption does not change when ``keep_classes`` changes.
    ``keep_classes`` keeps only those labels (e.g. all but the classes held out for zero-shot
    evaluation). ``labels`` (and ``images``, when the wrapped dataset holds its images as one
    tensor) are the kept samples', so evaluators can slice them like a ``TensorImageDataset``.
    """

    def __init__(
        self,
        dataset: Dataset,
        class_names: Sequence[str],
        templates: Sequence[str] = CAPTION_TEMPLATES,
        *,
        seed: int = 0,
        keep_classes: Sequence[int] | None = None,
    ) -> None:
        self.dataset = dataset
        self.class_names = [str(c) for c in class_names]
        self.templates = [str(t) for t in templates]
        self.seed = int(seed)
        if not self.class_names:
            raise ValueError("CaptionedDataset: class_names is empty; captions need a name per class")
        if not self.templates:
            raise ValueError("CaptionedDataset: templates is empty; give e.g. vfm.data.prompts.CAPTION_TEMPLATES")
        bad = [t for t in self.templates if t.count("{}") != 1 or "{" in t.replace("{}", "")]
        if bad:
            raise ValueError(
                f"CaptionedDataset: every template needs exactly one '{{}}' for the class name (and no other "
                f"braces), got {bad[:3]}; e.g. 'a photo of a {{}}.'"
            )
        n_cls = len(self.class_names)
        base_labels = getattr(dataset, "labels", None)
        if isinstance(base_labels, Tensor) and len(base_labels) == len(dataset):  # type: ignore[arg-type]
            all_labels = base_labels.to(torch.int64)
        else:
            all_labels = None  # only scanned when filtering needs it: for file datasets it decodes everything
        if keep_classes is None:
            self.indices: Tensor | None = None
            self._labels = all_labels
        else:
            keep = sorted({int(c) for c in keep_classes})
            if not keep:
                raise ValueError("CaptionedDataset: keep_classes is empty, so no sample would be left")
            if keep[0] < 0 or keep[-1] >= n_cls:
                raise ValueError(f"CaptionedDataset: keep_classes must be in [0, {n_cls}), got {keep}")
            if all_labels is None:
                all_labels = torch.tensor([int(dataset[i][1]) for i in range(len(dataset))], dtype=torch.int64)  # type: ignore[arg-type]
            mask = torch.isin(all_labels, torch.tensor(keep, dtype=torch.int64))
            self.indices = mask.nonzero().flatten()
            if len(self.indices) == 0:
                raise ValueError(f"CaptionedDataset: no sample has a label in keep_classes={keep}")
            self._labels = all_labels[self.indices]
        if self._labels is not None and len(self._labels):
            lo, hi = int(self._labels.min()), int(self._labels.max())
            if lo < 0 or hi >= n_cls:
                raise ValueError(
                    f"CaptionedDataset: labels must be in [0, {n_cls}) to name a class, found {lo}..{hi}; "
                    "unlabelled samples (-1) cannot be captioned"
                )
        self._images: Tensor | None = None

    def __len__(self) -> int:
        return len(self.indices) if self.indices is not None else len(self.dataset)  # type: ignore[arg-type]

    @property
    def labels(self) -> Tensor:
        """int64 ``[len(self)]``: the kept samples' labels."""
        if self._labels is None:
            self._labels = torch.tensor([int(self.dataset[i][1]) for i in range(len(self.dataset))], dtype=torch.int64)  # type: ignore[arg-type]
        return self._labels

    @property
    def images(self) -> Tensor:
        """uint8 ``[len(self), C, H, W]`` when the wrapped dataset has an ``images`` tensor (copied once if filtered)."""
        base = getattr(self.dataset, "images", None)
        if not isinstance(base, Tensor):
            raise AttributeError(f"{type(self.dataset).__name__} holds no images tensor")
        if self.indices is None:
            return base
        if self._images is None:
            self._images = base[self.indices]
        return self._images

    @property
    def captions(self) -> list[str]:
        """Every kept sample's caption, in order (what ``__getitem__`` yields, without reading an image)."""
        base = self.indices.tolist() if self.indices is not None else range(len(self))
        return [self.templates[self.template_index(j)].format(self.class_names[int(y)])
                for j, y in zip(base, self.labels.tolist(), strict=True)]

    def template_index(self, base_index: int) -> int:
        """Which template the wrapped dataset's item ``base_index`` uses (a pure function of seed and index)."""
        return _mix64(_mix64(self.seed & _MASK64) ^ (base_index & _MASK64)) % len(self.templates)

    def __getitem__(self, i: int) -> tuple[Tensor, str, int]:
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"index {i} out of range for CaptionedDataset of length {n}")
        i %= n
        j = int(self.indices[i]) if self.indices is not None else i
        image, label = self.dataset[j][:2]
        label = int(label)
        if not 0 <= label < len(self.class_names):
            raise ValueError(f"CaptionedDataset: item {j} has label {label}, not in [0, {len(self.class_names)})")
        return image, self.templates[self.template_index(j)].format(self.class_names[label]), label

    def __repr__(self) -> str:
        return f"CaptionedDataset(n={len(self)}, classes={len(self.class_names)}, templates={len(self.templates)})"


@yields_captions
def captioned(
    *,
    variant: str = "fashion_mnist",
    seed: int = 0,
    held_out_classes: Sequence[int] = (),
    templates: Sequence[str] | None = None,
    **benchmark_kwargs: Any,
) -> DataSplits:
    """A labelled benchmark (:func:`vfm.data.datasets.benchmark`, which receives ``variant``, ``seed``
    and every other keyword: ``root``, ``img_size``, ``num_classes``, ...) with template captions on
    its training split, for image–text pretraining with a labelled evaluation.

    ``train`` is :class:`CaptionedDataset` over the benchmark's train split without the
    ``held_out_classes`` (so zero-shot accuracy on them measures transfer to unseen classes);
    ``val``/``test`` are the benchmark's labelled splits with *all* classes. ``class_names`` are
    readable names for prompts (:data:`vfm.data.prompts.FASHION_MNIST_CLASS_NAMES_NATURAL` for
    Fashion-MNIST, the benchmark's names otherwise). ``templates`` None means
    :data:`vfm.data.prompts.CAPTION_TEMPLATES`; the caption of a sample is fixed by ``seed``.
    ``test_captions`` caption every test image by the same rule (its class name in a template
    chosen by hashing ``seed`` and its index), for image–text retrieval.
    """
    splits = benchmark(variant=variant, seed=seed, **benchmark_kwargs)
    num_classes = splits.num_classes
    held = sorted({int(c) for c in held_out_classes})
    if held and (held[0] < 0 or held[-1] >= num_classes):
        raise ValueError(f"dataset.held_out_classes must be class indices in [0, {num_classes}), got {held}")
    if len(held) >= num_classes:
        raise ValueError(f"dataset.held_out_classes={held} holds out every class; keep at least one for training")
    names = list(FASHION_MNIST_CLASS_NAMES_NATURAL) if variant == "fashion_mnist" else list(splits.class_names)
    keep = [c for c in range(num_classes) if c not in held] if held else None
    templates = CAPTION_TEMPLATES if templates is None else list(templates)
    train = CaptionedDataset(splits.train, names, templates, seed=seed, keep_classes=keep)
    return dataclasses.replace(splits, train=train, class_names=names,
                               test_captions=_test_captions(splits, names, templates, seed))


def _test_captions(splits: DataSplits, names: Sequence[str], templates: Sequence[str], seed: int) -> list[str] | None:
    """Each test image's caption by the training split's rule (all classes, held out or not)."""
    return CaptionedDataset(splits.test, names, templates, seed=seed).captions if splits.test is not None else None


@yields_captions
def synthetic_captions(*, class_names: Sequence[str] | None = None, templates: Sequence[str] | None = None,
                       **synthetic_kwargs: Any) -> DataSplits:
    """`vfm.data.datasets.synthetic` with template captions on its training split and
    ``test_captions`` by the same rule (tests, smoke runs)."""
    splits = synthetic(**synthetic_kwargs)
    names = list(class_names) if class_names else [f"pattern {chr(ord('a') + i)}" for i in range(splits.num_classes)]
    if len(names) != splits.num_classes:
        raise ValueError(f"dataset.class_names has {len(names)} names for {splits.num_classes} classes")
    templates = CAPTION_TEMPLATES if templates is None else list(templates)
    train = CaptionedDataset(splits.train, names, templates)
    return dataclasses.replace(splits, train=train, class_names=names,
                               test_captions=_test_captions(splits, names, templates, 0))
