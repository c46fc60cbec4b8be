"""Datasets: one builder per dataset, each returning a :class:`DataSplits`.

Every builder is keyword-only and also takes the dataset's *metadata* (``img_size``, ``in_chans``,
``mean``, ``std``, ``num_classes``) so that a Hydra node such as ``conf/dataset/fashion_mnist.yaml``
(``_target_: vfm.data.datasets.fashion_mnist`` + keys) instantiates it directly, while the rest of
the config can interpolate ``${dataset.img_size}`` etc. without loading any data. The builders
check that the declared metadata matches the data they load, so a wrong override fails loudly
instead of silently training on mis-shaped inputs.

Every dataset yields ``(image, label)`` with ``image`` a ``uint8`` tensor ``[C, H, W]`` and
``label`` an ``int`` (``-1`` when unlabelled). Augmentation, float conversion and normalisation
happen later, batched, in :mod:`vfm.data.transforms` (see :mod:`vfm.data.loader`).

Small datasets (MNIST-likes, CIFAR, STL-10, synthetic) are held in memory as one
:class:`TensorImageDataset` — the fast path: indexing is a tensor slice, there is no decoding.
Folder datasets (:func:`imagefolder`, :func:`unlabeled_folder`) decode lazily with PIL. A file
that cannot be decoded (truncated, empty, not an image) is only found when it is read, possibly
hours into a run, so by default (``bad_files="skip"``) it is replaced by the next item, logged
(logger ``vfm.data``) and counted (:attr:`ImageFileDataset.num_skipped`) instead of killing the
run; ``bad_files="fail"`` raises :class:`ImageDecodeError` naming the file instead.
"""

from __future__ import annotations

import gzip
import logging
import math
import operator
import os
import struct
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "IMG_EXTENSIONS",
    "DataSplits",
    "DatasetNotFoundError",
    "ImageDecodeError",
    "ImageFileDataset",
    "TensorImageDataset",
    "benchmark",
    "fashion_mnist",
    "imagefolder",
    "labelled_subset",
    "load_image",
    "mnist",
    "read_idx",
    "split_train_val",
    "stl10",
    "synthetic",
    "unlabeled_folder",
]

IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)
IMG_EXTENSIONS: tuple[str, ...] = (
    ".jpg",
    ".jpeg",
    ".png",
    ".ppm",
    ".bmp",
    ".pgm",
    ".tif",
    ".tiff",
    ".webp",
)

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

log = logging.getLogger("vfm.data")

# What a corrupt image can raise while being decoded: PIL raises OSError (UnidentifiedImageError,
# truncated files), but also ValueError/SyntaxError/EOFError from some plugins, and
# DecompressionBombError (an Exception subclass) for absurd sizes.
try:
    from PIL.Image import DecompressionBombError as _BombError
except ImportError:  # pragma: no cover - very old Pillow
    _BombError = OSError  # type: ignore[assignment,misc]
DECODE_ERRORS: tuple[type[BaseException], ...] = (OSError, ValueError, SyntaxError, EOFError, _BombError)

# What ImageFileDataset does with an undecodable file (dataset.bad_files).
BAD_FILE_POLICIES: tuple[str, ...] = ("skip", "fail")
# How many consecutive undecodable items "skip" tolerates before concluding that the data (or its
# mount) is broken rather than sprinkled with odd bad files.
_MAX_CONSECUTIVE_BAD = 16
# How many skips are always logged; after that only every power of two (the log must not flood,
# but the growing count must keep appearing).
_N_LOGGED = 5
# Slots of the shared skip counter: one per DataLoader worker (+1 for the main process), so each
# slot has a single writer and no increment is lost to a race between processes.
_COUNTER_SLOTS = 257


# --------------------------------------------------------------------------------------------
# Containers
# --------------------------------------------------------------------------------------------


@dataclass
class DataSplits:
    """The splits of one dataset plus the metadata the models need.

    ``train`` is what pretraining iterates over; ``val`` is for hyperparameter selection by the
    evaluators (carved from the official training set, disjoint from ``train``); ``test`` is the
    official test set, reported only. Each yields ``(uint8 [C,H,W], int)``, label ``-1`` when
    unlabelled. ``mean``/``std`` always have ``in_chans`` entries.
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


def _check_bad_files(bad_files: str) -> None:
    if bad_files not in BAD_FILE_POLICIES:
        raise ValueError(
            f"dataset.bad_files must be one of {', '.join(repr(p) for p in BAD_FILE_POLICIES)}, got {bad_files!r} "
            "('skip': replace an undecodable image by the next item and count it; 'fail': stop with an error)"
        )


class ImageFileDataset(Dataset):
    """Lazily decoded image files, each returned as uint8 ``[C, crop, crop]``.

    Decoding follows the usual ImageNet recipe: the shorter side is resized to ``resize``
    (bilinear, PIL's antialiased resampling), then the centre ``crop x crop`` is taken. Using one
    fixed output size makes batches stackable; for pretraining ``crop == resize`` (``load_size``)
    and the multi-crop augmentation then samples its random resized crops from that square
    image, for evaluation ``crop == img_size`` (the standard "resize 256, centre-crop 224").

    ``bad_files`` says what an undecodable file (:class:`ImageDecodeError`: truncated, empty, not
    an image, unreadable) does. ``"fail"`` raises, naming the file. ``"skip"`` returns the next
    item instead (``(i + 1) % n``, then ``i + 2``, ...; with that item's label): deterministic, so
    batches keep their size, every process agrees and a resumed run sees the same data. Every
    failed decode is logged (the first few, then at powers of two) and counted in
    :attr:`num_skipped`; 16 failures in a row (``_MAX_CONSECUTIVE_BAD``) raise ``RuntimeError``,
    because then the data set (or its mount) is broken, not sprinkled with odd bad files.
    """

    def __init__(
        self,
        samples: Sequence[tuple[str, int]],
        *,
        resize: int,
        crop: int,
        in_chans: int,
        bad_files: str = "skip",
    ) -> None:
        if in_chans not in (1, 3):
            raise ValueError(f"ImageFileDataset: in_chans must be 1 or 3, got {in_chans}")
        if not 0 < crop <= resize:
            raise ValueError(f"ImageFileDataset: need 0 < crop <= resize, got crop={crop}, resize={resize}")
        _check_bad_files(bad_files)
        self.samples = list(samples)
        self.labels = torch.tensor([label for _, label in self.samples], dtype=torch.int64)
        self.resize = resize
        self.crop = crop
        self.in_chans = in_chans
        self.bad_files = bad_files
        # Skip counts in shared memory, created here so that DataLoader workers write into the
        # same storage the main process reads: fork inherits the mapping, and spawn pickles the
        # dataset with torch's reductions, which pass shared storage by handle, not by copy.
        # One slot per worker (see _slot) keeps every increment race-free without a lock.
        self._skips = torch.zeros(_COUNTER_SLOTS, dtype=torch.int64).share_memory_()

    def __len__(self) -> int:
        return len(self.samples)

    @property
    def num_skipped(self) -> int:
        """How many times an undecodable file was replaced, summed over this process and its DataLoader workers.

        A skip event per failed read: a bad file read in two epochs counts twice, and item ``i``
        replaced by a bad ``i + 1`` counts both.
        """
        return int(self._skips.sum())

    def __getitem__(self, i: int) -> tuple[Tensor, int]:
        n = len(self)
        i = operator.index(i)
        if not -n <= i < n:
            raise IndexError(f"index {i} out of range for ImageFileDataset of length {n}")
        i %= n
        if self.bad_files == "fail":
            try:
                return self._load(i)
            except ImageDecodeError as e:
                raise ImageDecodeError(
                    f"{e}. To skip undecodable images instead (each is replaced by the next item, logged and "
                    "counted), set dataset.bad_files=skip"
                ) from e
        errors = []
        for t in range(min(_MAX_CONSECUTIVE_BAD, n)):
            j = (i + t) % n
            try:
                return self._load(j)
            except ImageDecodeError as e:
                errors.append(str(e))
                self._count_skip(e, (j + 1) % n)
        raise RuntimeError(
            f"ImageFileDataset: {len(errors)} consecutive items from index {i} failed to decode, so the data looks "
            f"corrupt, not just an odd bad file: {'; '.join(errors[:_N_LOGGED])}. Check the files under dataset.root "
            "(is the disk or mount healthy?)."
        )

    def _load(self, i: int) -> tuple[Tensor, int]:
        path, label = self.samples[i]
        return load_image(path, resize=self.resize, crop=self.crop, in_chans=self.in_chans), label

    @staticmethod
    def _slot() -> int:
        """This process's counter slot: 0 in the main process, ``1 + worker id`` in a DataLoader worker."""
        from torch.utils.data import get_worker_info

        info = get_worker_info()
        return 0 if info is None else 1 + info.id % (_COUNTER_SLOTS - 1)

    def _count_skip(self, error: ImageDecodeError, replacement: int) -> None:
        self._skips[self._slot()] += 1
        c = self.num_skipped
        if c <= _N_LOGGED or c & (c - 1) == 0:
            log.warning(
                "ImageFileDataset: %s; using item %d instead (dataset.bad_files=skip). %d undecodable image(s) "
                "skipped so far",
                error, replacement, c,
            )

    def __repr__(self) -> str:
        return (
            f"ImageFileDataset(n={len(self)}, resize={self.resize}, crop={self.crop}, in_chans={self.in_chans}, "
            f"bad_files={self.bad_files!r})"
        )


class DatasetNotFoundError(FileNotFoundError):
    """Raised when a dataset's files cannot be found; the message lists where we looked and the fixes."""


class ImageDecodeError(OSError):
    """One image file cannot be read or decoded (truncated, empty, not an image); the message names it.

    An ``OSError`` (what PIL raises for most broken files), so ``except OSError`` still catches it;
    its own class lets :class:`ImageFileDataset` skip exactly the decode failures and nothing else.
    """


# --------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------

# idx type codes (http://yann.lecun.com/exdb/mnist/, "THE IDX FILE FORMAT").
_IDX_DTYPES: dict[int, np.dtype] = {
    0x08: np.dtype(np.uint8),
    0x09: np.dtype(np.int8),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}


def read_idx(path: str | os.PathLike) -> Tensor:
    """Read an idx file (MNIST format), gzipped (``.gz``) or not, into a tensor.

    Header: two zero bytes, a type code, the number of dimensions, then one big-endian uint32 per
    dimension. The magic number and the payload length are checked so a truncated download or a
    wrong file fails here with the file name, not as a reshape error later.
    """
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError) as e:  # gzip.BadGzipFile is an OSError
        raise ValueError(f"{path}: cannot read idx file ({e})") from e
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        magic = raw[:4].hex() if len(raw) >= 4 else raw.hex()
        raise ValueError(
            f"{path}: bad idx magic number 0x{magic} (expected 0x0000TTNN with type TT in "
            f"{sorted(hex(t) for t in _IDX_DTYPES)}); the file is not an idx file or is corrupt"
        )
    dtype = _IDX_DTYPES[raw[2]]
    ndim = raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise ValueError(f"{path}: truncated idx header ({len(raw)} bytes, need {header})")
    shape = struct.unpack(f">{ndim}I", raw[4:header])
    expected = math.prod(shape) * dtype.itemsize
    if len(raw) - header != expected:
        raise ValueError(
            f"{path}: idx payload has {len(raw) - header} bytes but shape {shape} of {dtype} needs {expected}; "
            "the file is truncated or corrupt"
        )
    array = np.frombuffer(raw, dtype=dtype, offset=header).reshape(shape)
    # Native byte order and a writable copy: torch.from_numpy needs both.
    return torch.from_numpy(array.astype(dtype.newbyteorder("="), copy=True))


def _split_indices(n: int, val_fraction: float, seed: int) -> tuple[Tensor, Tensor]:
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
    train_idx, val_idx = _split_indices(len(dataset), val_fraction, seed)
    train = TensorImageDataset(dataset.images[train_idx], dataset.labels[train_idx])
    if len(val_idx) == 0:
        return train, None
    return train, TensorImageDataset(dataset.images[val_idx], dataset.labels[val_idx])


def labelled_subset(dataset: TensorImageDataset) -> TensorImageDataset:
    """The samples of ``dataset`` whose label is not -1 (e.g. STL-10's labelled part of ``train``)."""
    keep = dataset.labels >= 0
    return TensorImageDataset(dataset.images[keep], dataset.labels[keep])


def _stats(mean: Sequence[float], std: Sequence[float], in_chans: int) -> tuple[tuple[float, ...], tuple[float, ...]]:
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


# --------------------------------------------------------------------------------------------
# MNIST-likes (idx files)
# --------------------------------------------------------------------------------------------

_IDX_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}


def _find_idx_files(directory: Path) -> dict[str, Path] | None:
    """The four idx files in ``directory`` (each plain or ``.gz``), or None if any is missing."""
    found = {}
    for key, base in _IDX_FILES.items():
        for candidate in (directory / base, directory / f"{base}.gz"):
            if candidate.is_file():
                found[key] = candidate
                break
        else:
            return None
    return found


def _load_idx_dataset(
    *,
    display: str,
    tv_name: str,
    alias: str,
    root: str,
    download: bool,
    system_dirs: Sequence[str],
    apt_package: str | None,
) -> tuple[TensorImageDataset, TensorImageDataset]:
    root_path = Path(root)
    # torchvision's layout first (what download=true produces), then a plain folder, then root
    # itself, then system-wide copies (Debian's dataset-fashion-mnist installs the .gz files).
    searched = [root_path / tv_name / "raw", root_path / alias, root_path, *(Path(d) for d in system_dirs)]
    files = next((f for d in searched if (f := _find_idx_files(d)) is not None), None)
    if files is None and download:
        import torchvision.datasets

        getattr(torchvision.datasets, tv_name)(str(root_path), train=True, download=True)
        files = _find_idx_files(root_path / tv_name / "raw")
    if files is None:
        fixes = [f"run `make data` (fetches the files into {root_path})"]
        if apt_package:
            fixes.append(f"`sudo apt install {apt_package}` (Debian package, installs into /usr/share/datasets/)")
        fixes.append(f"pass `dataset.download=true` to download with torchvision into {root_path / tv_name / 'raw'}")
        raise DatasetNotFoundError(
            f"{display} not found: no directory holds all of {', '.join(_IDX_FILES.values())} "
            "(plain or .gz). Searched:\n"
            + "".join(f"  - {d}\n" for d in searched)
            + "Fix: "
            + "; or ".join(fixes)
            + "."
        )
    splits = []
    for part in ("train", "test"):
        images = read_idx(files[f"{part}_images"])
        labels = read_idx(files[f"{part}_labels"])
        if images.dtype != torch.uint8 or images.ndim != 3 or labels.ndim != 1 or labels.shape[0] != images.shape[0]:
            raise ValueError(
                f"{display}: {files[f'{part}_images']} / {files[f'{part}_labels']} do not hold uint8 images "
                f"[N, H, W] and N labels (got {images.dtype} {tuple(images.shape)} and {tuple(labels.shape)})"
            )
        splits.append(TensorImageDataset(images.unsqueeze(1), labels.to(torch.int64)))
    return splits[0], splits[1]


# --------------------------------------------------------------------------------------------
# torchvision-backed in-memory datasets
# --------------------------------------------------------------------------------------------


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
    mean_t, std_t = _stats(mean, std, in_chans)
    if not 0.0 <= val_fraction < 1.0:  # checked before loading any image
        raise ValueError(f"dataset.val_fraction must be in [0, 1), got {val_fraction}")
    if variant in _IDX_DATASETS:
        display, tv_name, alias, apt_package, class_names, default_dirs = _IDX_DATASETS[variant]
        full_train, test = _load_idx_dataset(
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
    mean_t, std_t = _stats(mean, std, in_chans)
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


# --------------------------------------------------------------------------------------------
# Image folders (lazily decoded)
# --------------------------------------------------------------------------------------------


def load_image(path: str | os.PathLike, *, resize: int, crop: int, in_chans: int) -> Tensor:
    """Decode one image file to uint8 ``[in_chans, crop, crop]``: shorter side to ``resize``, centre crop.

    A file that cannot be decoded raises :class:`ImageDecodeError` naming it, whatever PIL raised:
    ``OSError`` (``UnidentifiedImageError`` for empty or non-image files, "image file is truncated"),
    but some plugins raise ``ValueError``, ``SyntaxError`` or ``EOFError``, and absurd sizes
    ``DecompressionBombError``. Only the reading and decoding is guarded, so a bug elsewhere is
    not mistaken for a bad file. Truncated files fail because every pixel is decoded inside the
    guard (PIL decodes lazily) and ``PIL.ImageFile.LOAD_TRUNCATED_IMAGES`` stays False: setting it
    would make PIL pad truncated images with grey instead of raising.
    """
    from PIL import Image

    try:
        with Image.open(path) as file:
            file.load()  # decode everything now, while a failure still means "this file is bad"
            img = file.convert("RGB" if in_chans == 3 else "L")
    except DECODE_ERRORS as e:
        raise ImageDecodeError(f"cannot decode image {path}: {type(e).__name__}: {e}") from e
    w, h = img.size
    scale = resize / min(w, h)
    # Shorter side exactly `resize`, the longer one rounded (so the crop always fits).
    new_w, new_h = (resize, max(resize, round(h * scale))) if w <= h else (max(resize, round(w * scale)), resize)
    if (new_w, new_h) != (w, h):
        img = img.resize((new_w, new_h), Image.BILINEAR)
    left, top = (new_w - crop) // 2, (new_h - crop) // 2
    img = img.crop((left, top, left + crop, top + crop))
    array = np.asarray(img, dtype=np.uint8)
    if array.ndim == 2:
        array = array[:, :, None]
    return torch.from_numpy(array.copy()).permute(2, 0, 1).contiguous()


def _find_images(directory: Path, extensions: Sequence[str]) -> list[Path]:
    exts = tuple(e.lower() for e in extensions)
    files = []
    for dirpath, dirnames, filenames in os.walk(directory, followlinks=True):
        dirnames.sort()  # deterministic order across file systems
        files.extend(Path(dirpath) / f for f in sorted(filenames) if f.lower().endswith(exts) and not f.startswith("."))
    return files


def _class_folder_samples(
    directory: Path, class_to_idx: dict[str, int] | None
) -> tuple[list[tuple[str, int]], list[str]]:
    """``(path, label)`` for every image under ``directory/<class>/`` (recursively), and the class names."""
    classes = sorted(e.name for e in os.scandir(directory) if e.is_dir() and not e.name.startswith("."))
    if class_to_idx is None:
        class_to_idx = {c: i for i, c in enumerate(classes)}
    unknown = [c for c in classes if c not in class_to_idx]
    if unknown:
        raise ValueError(f"{directory}: class folders {unknown[:5]} are not among the training classes")
    samples = [(str(p), class_to_idx[c]) for c in classes for p in _find_images(directory / c, IMG_EXTENSIONS)]
    return samples, classes


def _check_size(img_size: int, load_size: int, in_chans: int) -> None:
    if in_chans not in (1, 3):
        raise ValueError(f"dataset.in_chans must be 1 (grayscale) or 3 (RGB), got {in_chans}")
    if not 0 < img_size <= load_size:
        raise ValueError(
            f"need 0 < dataset.img_size <= dataset.load_size, got img_size={img_size}, load_size={load_size}"
        )


def imagefolder(
    *,
    root: str,
    train_dir: str = "train",
    test_dir: str = "val",
    load_size: int = 256,
    img_size: int = 224,
    in_chans: int = 3,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    val_fraction: float = 0.01,
    seed: int = 0,
    num_classes: int | None = None,
    bad_files: str = "skip",
) -> DataSplits:
    """A class-subfolder tree (``root/train/<class>/**/img``), e.g. ImageNet, decoded lazily.

    ``train`` images are ``load_size`` squares (shorter side resized to ``load_size``, centre
    crop): multi-crop samples its random crops from them. ``val`` (a seeded ``val_fraction`` of
    ``root/train_dir``) and ``test`` (``root/test_dir`` if it exists, else None) are the standard
    evaluation view: resize to ``load_size``, centre-crop ``img_size``. ``num_classes`` None means
    "as many as there are class folders"; an int is checked against them. ``bad_files`` ("skip" or
    "fail") is what every split does with an undecodable image (see :class:`ImageFileDataset`).
    """
    _check_size(img_size, load_size, in_chans)
    _check_bad_files(bad_files)
    mean_t, std_t = _stats(mean, std, in_chans)
    train_path = Path(root) / train_dir
    if not train_path.is_dir():
        raise DatasetNotFoundError(
            f"imagefolder: {train_path} does not exist. Set dataset.root to a folder holding "
            f"'{train_dir}/<class>/<images>' (and optionally '{test_dir}/<class>/<images>'), or dataset.train_dir."
        )
    samples, class_names = _class_folder_samples(train_path, None)
    if not class_names or not samples:
        raise DatasetNotFoundError(
            f"imagefolder: found no {'class folders' if not class_names else 'images'} under {train_path} "
            f"(expected '{train_path}/<class>/<image>' with extensions {', '.join(IMG_EXTENSIONS)})"
        )
    if num_classes is not None and num_classes != len(class_names):
        raise ValueError(
            f"dataset.num_classes={num_classes} but {train_path} has {len(class_names)} class folders; "
            f"set dataset.num_classes={len(class_names)}"
        )
    train_idx, val_idx = _split_indices(len(samples), val_fraction, seed)
    train = ImageFileDataset(
        [samples[i] for i in train_idx.tolist()], resize=load_size, crop=load_size, in_chans=in_chans,
        bad_files=bad_files,
    )
    val = None
    if len(val_idx):
        val = ImageFileDataset(
            [samples[i] for i in val_idx.tolist()], resize=load_size, crop=img_size, in_chans=in_chans,
            bad_files=bad_files,
        )
    test = None
    test_path = Path(root) / test_dir
    if test_dir and test_path.is_dir() and test_path.resolve() != train_path.resolve():
        test_samples, _ = _class_folder_samples(test_path, {c: i for i, c in enumerate(class_names)})
        if test_samples:
            test = ImageFileDataset(test_samples, resize=load_size, crop=img_size, in_chans=in_chans,
                                    bad_files=bad_files)
    return DataSplits(train=train, val=val, test=test, img_size=img_size, in_chans=in_chans, mean=mean_t,
                      std=std_t, num_classes=len(class_names), class_names=class_names)


def unlabeled_folder(
    *,
    root: str,
    load_size: int = 256,
    img_size: int = 224,
    in_chans: int = 3,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    num_classes: int = 0,
    extensions: Sequence[str] = IMG_EXTENSIONS,
    bad_files: str = "skip",
) -> DataSplits:
    """Every image anywhere under ``root`` (recursive), unlabelled (label -1), for pretraining only.

    Images are ``load_size`` squares as in :func:`imagefolder`; ``val``/``test`` are None.
    ``num_classes`` exists only so every dataset config defines it; it must be 0. ``bad_files``
    ("skip" or "fail") is what an undecodable image does (see :class:`ImageFileDataset`).
    """
    _check_size(img_size, load_size, in_chans)
    _check_bad_files(bad_files)
    mean_t, std_t = _stats(mean, std, in_chans)
    if num_classes != 0:
        raise ValueError(f"dataset.num_classes must be 0 for an unlabelled folder, got {num_classes}")
    root_path = Path(root)
    if not root_path.is_dir():
        raise DatasetNotFoundError(
            f"unlabeled_folder: {root_path} does not exist; set dataset.root to a folder of images"
        )
    files = _find_images(root_path, extensions)
    if not files:
        raise DatasetNotFoundError(
            f"unlabeled_folder: found no images with extensions {', '.join(extensions)} under {root_path} (searched recursively)"
        )
    train = ImageFileDataset([(str(p), -1) for p in files], resize=load_size, crop=load_size, in_chans=in_chans,
                             bad_files=bad_files)
    return DataSplits(train=train, val=None, test=None, img_size=img_size, in_chans=in_chans, mean=mean_t,
                      std=std_t, num_classes=0, class_names=[])


# --------------------------------------------------------------------------------------------
# Synthetic
# --------------------------------------------------------------------------------------------


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
    mean_t, std_t = _stats(mean, std, in_chans)
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
