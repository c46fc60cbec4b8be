"""The containers every dataset builder returns, and the helpers they share: :class:`DataSplits`
(the splits plus the metadata the models need), :class:`TensorImageDataset` (an in-memory image
dataset, the fast path), seeded train/val splits and normalisation statistics."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor
from torch.utils.data import Dataset

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "DataSplits",
    "DatasetNotFoundError",
    "TensorImageDataset",
    "labelled_subset",
    "norm_stats",
    "split_indices",
    "split_train_val",
]

IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)


@dataclass
class DataSplits:
    """The splits of one dataset plus the metadata the models need.

    ``train`` is what pretraining iterates over; ``val`` is for hyperparameter selection by the
    evaluators (carved from the official training set, disjoint from ``train``); ``test`` is the
    official test set, reported only. Each yields ``(uint8 [C,H,W], int)``, label ``-1`` when
    unlabelled. ``mean``/``std`` always have ``in_chans`` entries. ``test_captions``, set by the
    image–text builders whose test images have a caption, is each test item's caption in order
    (what image–text retrieval pairs them with); None when the test split has none.
    """

    train: Dataset
    val: Dataset | None
    test: Dataset | None
    img_size: int
    in_chans: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    num_classes: int
    class_names: list[str] = field(default_factory=list)
    test_captions: list[str] | None = None


class TensorImageDataset(Dataset):
    """An in-memory image dataset: ``images`` uint8 ``[N, C, H, W]``, ``labels`` int64 ``[N]``.

    Both are public: batched consumers (the eval loader, feature extraction) slice them directly
    instead of going through ``__getitem__`` one item at a time.
    """

    def __init__(self, images: Tensor, labels: Tensor) -> None:
        if not isinstance(images, Tensor) or images.dtype != torch.uint8 or images.ndim != 4:
            raise ValueError(
                "TensorImageDataset: images must be a uint8 tensor [N, C, H, W], got "
                f"{getattr(images, 'dtype', type(images))} of shape {tuple(getattr(images, 'shape', ()))}"
            )
        labels = torch.as_tensor(labels)
        if labels.ndim != 1 or labels.shape[0] != images.shape[0]:
            raise ValueError(
                f"TensorImageDataset: labels must be [N] with N={images.shape[0]}, got {tuple(labels.shape)}"
            )
        if labels.is_floating_point() or labels.is_complex():
            raise ValueError(f"TensorImageDataset: labels must be integers, got {labels.dtype}")
        self.images = images
        self.labels = labels.to(torch.int64)

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, i: int) -> tuple[Tensor, int]:
        return self.images[i], int(self.labels[i])

    def __repr__(self) -> str:
        n, c, h, w = self.images.shape
        return f"TensorImageDataset(n={n}, shape=[{c},{h},{w}])"


class DatasetNotFoundError(FileNotFoundError):
    """Raised when a dataset's files cannot be found; the message lists where we looked and the fixes."""


def split_indices(n: int, val_fraction: float, seed: int) -> tuple[Tensor, Tensor]:
    """Seeded disjoint ``(train, val)`` index sets covering ``range(n)``, each in increasing order."""
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"dataset.val_fraction must be in [0, 1), got {val_fraction}")
    n_val = round(n * val_fraction)
    if val_fraction > 0 and n_val == 0 and n > 1:
        n_val = 1  # asked for a validation split: give at least one sample
    if n_val >= n:
        raise ValueError(f"dataset.val_fraction={val_fraction} leaves no training samples out of {n}")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    # Sorted so each split keeps the original order of the data (readable, and cache-friendly).
    return perm[n_val:].sort().values, perm[:n_val].sort().values


def split_train_val(
    dataset: TensorImageDataset, val_fraction: float, seed: int
) -> tuple[TensorImageDataset, TensorImageDataset | None]:
    """Split off a seeded random ``val_fraction`` of ``dataset`` as a validation set.

    The two parts are disjoint and cover the dataset; ``val`` is ``None`` when ``val_fraction``
    is 0. The same seed always gives the same split.
    """
    train_idx, val_idx = split_indices(len(dataset), val_fraction, seed)
    train = TensorImageDataset(dataset.images[train_idx], dataset.labels[train_idx])
    if len(val_idx) == 0:
        return train, None
    return train, TensorImageDataset(dataset.images[val_idx], dataset.labels[val_idx])


def labelled_subset(dataset: TensorImageDataset) -> TensorImageDataset:
    """The samples of ``dataset`` whose label is not -1 (e.g. STL-10's labelled part of ``train``)."""
    keep = dataset.labels >= 0
    return TensorImageDataset(dataset.images[keep], dataset.labels[keep])


def norm_stats(mean: Sequence[float], std: Sequence[float], in_chans: int) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Normalisation statistics as float tuples of length ``in_chans`` (a single value broadcasts)."""
    mean_t = tuple(float(m) for m in mean)
    std_t = tuple(float(s) for s in std)
    for name, values in (("mean", mean_t), ("std", std_t)):
        if len(values) not in (1, in_chans):
            raise ValueError(
                f"dataset.{name} has {len(values)} values but dataset.in_chans={in_chans} "
                f"(give {in_chans} values, or one to use for every channel)"
            )
    if any(s <= 0 for s in std_t):
        raise ValueError(f"dataset.std must be positive, got {list(std_t)}")
    if len(mean_t) == 1:
        mean_t = mean_t * in_chans
    if len(std_t) == 1:
        std_t = std_t * in_chans
    return mean_t, std_t
