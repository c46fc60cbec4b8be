"""The small labelled benchmarks, held in memory as uint8 tensors: Fashion-MNIST, MNIST, CIFAR-10/100
(:func:`benchmark`) and STL-10 (:func:`stl10`)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from vfm.data.datasets.core import DatasetNotFoundError, DataSplits, TensorImageDataset, norm_stats, split_train_val
from vfm.data.datasets.idx import load_idx_dataset

__all__ = ["FASHION_MNIST_CLASSES", "MNIST_CLASSES", "benchmark", "fashion_mnist", "mnist", "stl10"]

FASHION_MNIST_CLASSES = [
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
]
MNIST_CLASSES = [str(i) for i in range(10)]


def _check_declared(name: str, images: Tensor, *, img_size: int, in_chans: int) -> None:
    """Fail with the config key to change when the declared shape does not match the data."""
    _, c, h, w = images.shape
    if c != in_chans:
        raise ValueError(f"dataset.in_chans={in_chans} but {name} images have {c} channel(s); set dataset.in_chans={c}")
    if h != w or h != img_size:
        raise ValueError(f"dataset.img_size={img_size} but {name} images are {h}x{w}; set dataset.img_size={h}")


def _check_num_classes(name: str, num_classes: int, expected: int, labels: Tensor) -> None:
    if num_classes != expected:
        raise ValueError(
            f"dataset.num_classes={num_classes} but {name} has {expected} classes; set dataset.num_classes={expected}"
        )
    labelled = labels[labels >= 0]
    if labelled.numel() and int(labelled.max()) >= expected:
        raise ValueError(f"{name}: found label {int(labelled.max())} >= num_classes={expected}; the data is corrupt")


def _torchvision_dataset(display: str, cls_name: str, root: str, download: bool, folder: str, **kwargs):
    import torchvision.datasets

    cls = getattr(torchvision.datasets, cls_name)
    try:
        return cls(root=str(root), download=download, **kwargs)
    except RuntimeError as e:
        # torchvision raises a bare RuntimeError("Dataset not found or corrupted ...").
        if download:
            raise
        raise DatasetNotFoundError(
            f"{display} not found or corrupt in {Path(root) / folder} ({e}). "
            f"Fix: run `make data`; or pass `dataset.download=true` to download it with torchvision into {root}."
        ) from e


# In-memory labelled benchmarks. idx files: variant -> (display name, torchvision class / raw folder,
# alternative folder, Debian package, class names, default system dirs).
_IDX_DATASETS: dict[str, tuple[str, str, str, str | None, list[str], tuple[str, ...]]] = {
    "fashion_mnist": ("Fashion-MNIST", "FashionMNIST", "fashion-mnist", "dataset-fashion-mnist",
                      FASHION_MNIST_CLASSES, ("/usr/share/datasets/fashion-mnist",)),
    "mnist": ("MNIST", "MNIST", "mnist", None, MNIST_CLASSES, ("/usr/share/datasets/mnist",)),
}
# torchvision pickles: variant -> (display name, torchvision class, folder torchvision extracts to)
_CIFAR = {
    "cifar10": ("CIFAR-10", "CIFAR10", "cifar-10-batches-py"),
    "cifar100": ("CIFAR-100", "CIFAR100", "cifar-100-python"),
}


def _load_cifar(variant: str, root: str, download: bool) -> tuple[TensorImageDataset, TensorImageDataset, list[str]]:
    display, cls_name, folder = _CIFAR[variant]
    parts = []
    class_names: list[str] = []
    for train in (True, False):
        ds = _torchvision_dataset(display, cls_name, root, download, folder, train=train)
        # CIFAR is stored as numpy uint8 [N, 32, 32, 3]: make it [N, 3, 32, 32] once, contiguous.
        images = torch.from_numpy(np.ascontiguousarray(ds.data)).permute(0, 3, 1, 2).contiguous()
        parts.append(TensorImageDataset(images, torch.tensor(ds.targets, dtype=torch.int64)))
        class_names = list(ds.classes)
    return parts[0], parts[1], class_names


def benchmark(
    *,
    variant: str = "fashion_mnist",
    root: str = "data",
    download: bool = False,
    val_fraction: float = 0.1,
    seed: int = 0,
    img_size: int = 28,
    in_chans: int = 1,
    mean: Sequence[float] = (0.2860,),
    std: Sequence[float] = (0.3530,),
    num_classes: int = 10,
    system_dirs: Sequence[str] | None = None,
) -> DataSplits:
    """The small labelled benchmarks, held in memory as uint8 tensors, by ``variant``:

    - ``fashion_mnist`` (Xiao et al. 2017) and ``mnist`` (LeCun et al. 1998): 60k train / 10k test
      28x28 grayscale. The four idx files (plain or gzipped) are looked for in
      ``root/<FashionMNIST|MNIST>/raw`` (torchvision's layout), ``root/<fashion-mnist|mnist>``,
      ``root``, then each of ``system_dirs`` (default: where Debian's ``dataset-fashion-mnist``
      puts them), and downloaded with torchvision when ``download`` is set.
    - ``cifar10`` / ``cifar100`` (Krizhevsky 2009): 50k train / 10k test 32x32 RGB, read by
      torchvision from ``root/cifar-10-batches-py`` / ``root/cifar-100-python``. CIFAR-10's ``std``
      is the true per-pixel standard deviation of the train set (not the often copied 0.2023/...).

    ``val`` is a seeded random ``val_fraction`` of the official train set, ``test`` the official
    test set. Each variant's yaml file sets its mean/std, size and class count.
    """
    if variant not in _IDX_DATASETS and variant not in _CIFAR:
        raise ValueError(f"dataset.variant must be one of {sorted([*_IDX_DATASETS, *_CIFAR])}, got {variant!r}")
    mean_t, std_t = norm_stats(mean, std, in_chans)
    if not 0.0 <= val_fraction < 1.0:  # checked before loading any image
        raise ValueError(f"dataset.val_fraction must be in [0, 1), got {val_fraction}")
    if variant in _IDX_DATASETS:
        display, tv_name, alias, apt_package, class_names, default_dirs = _IDX_DATASETS[variant]
        full_train, test = load_idx_dataset(
            display=display, tv_name=tv_name, alias=alias, root=root, download=download,
            system_dirs=default_dirs if system_dirs is None else system_dirs, apt_package=apt_package,
        )
    else:
        display = _CIFAR[variant][0]
        full_train, test, class_names = _load_cifar(variant, root, download)
    _check_declared(display, full_train.images, img_size=img_size, in_chans=in_chans)
    _check_num_classes(display, num_classes, len(class_names), torch.cat([full_train.labels, test.labels]))
    train, val = split_train_val(full_train, val_fraction, seed)
    return DataSplits(train=train, val=val, test=test, img_size=img_size, in_chans=in_chans, mean=mean_t,
                      std=std_t, num_classes=num_classes, class_names=list(class_names))


def fashion_mnist(**kwargs: Any) -> DataSplits:
    """Fashion-MNIST with its defaults: ``benchmark(variant="fashion_mnist", **kwargs)``."""
    return benchmark(variant="fashion_mnist", **kwargs)


def mnist(**kwargs: Any) -> DataSplits:
    """MNIST: ``benchmark(variant="mnist", mean=(0.1307,), std=(0.3081,), **kwargs)``."""
    return benchmark(**{"variant": "mnist", "mean": (0.1307,), "std": (0.3081,), **kwargs})


def stl10(
    *,
    root: str = "data",
    download: bool = False,
    unlabeled: bool = True,
    val_fraction: float = 0.1,
    seed: int = 0,
    img_size: int = 96,
    in_chans: int = 3,
    mean: Sequence[float] = (0.4467, 0.4398, 0.4066),
    std: Sequence[float] = (0.2603, 0.2566, 0.2713),
    num_classes: int = 10,
) -> DataSplits:
    """STL-10 (Coates et al. 2011): 5k labelled + 100k unlabelled train, 8k test, 96x96 RGB.

    ``val`` is a seeded ``val_fraction`` of the 5k labelled images. With ``unlabeled`` the
    pretraining ``train`` split is the rest of the labelled images followed by the 100k unlabelled
    ones (label -1, ~2.8 GB in memory); evaluators that need labels should use
    :func:`labelled_subset` on it. Files are expected in ``root/stl10_binary``.
    """
    mean_t, std_t = norm_stats(mean, std, in_chans)
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"dataset.val_fraction must be in [0, 1), got {val_fraction}")

    def load(split: str) -> tuple[TensorImageDataset, list[str]]:
        ds = _torchvision_dataset("STL-10", "STL10", root, download, "stl10_binary", split=split)
        # STL10.data is already uint8 [N, 3, 96, 96]; unlabelled images carry label -1.
        images = torch.from_numpy(np.ascontiguousarray(ds.data))
        return TensorImageDataset(images, torch.from_numpy(np.asarray(ds.labels, dtype=np.int64))), list(ds.classes)

    labelled, class_names = load("train")
    test, _ = load("test")
    _check_declared("STL-10", labelled.images, img_size=img_size, in_chans=in_chans)
    _check_num_classes("STL-10", num_classes, len(class_names), labelled.labels)
    train, val = split_train_val(labelled, val_fraction, seed)
    if unlabeled:
        extra, _ = load("unlabeled")
        train = TensorImageDataset(torch.cat([train.images, extra.images]), torch.cat([train.labels, extra.labels]))
    return DataSplits(train=train, val=val, test=test, img_size=img_size, in_chans=in_chans, mean=mean_t,
                      std=std_t, num_classes=num_classes, class_names=class_names)
