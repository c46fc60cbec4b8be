"""The idx file format of MNIST and Fashion-MNIST: a parser, and the loader of the four files."""

from __future__ import annotations

import gzip
import math
import os
import struct
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from vfm.data.datasets.core import DatasetNotFoundError, TensorImageDataset

__all__ = ["IDX_FILES", "load_idx_dataset", "read_idx"]

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


IDX_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}


def _find_idx_files(directory: Path) -> dict[str, Path] | None:
    """The four idx files in ``directory`` (each plain or ``.gz``), or None if any is missing."""
    found = {}
    for key, base in IDX_FILES.items():
        for candidate in (directory / base, directory / f"{base}.gz"):
            if candidate.is_file():
                found[key] = candidate
                break
        else:
            return None
    return found


def load_idx_dataset(
    *,
    display: str,
    tv_name: str,
    alias: str,
    root: str,
    download: bool,
    system_dirs: Sequence[str],
    apt_package: str | None,
) -> tuple[TensorImageDataset, TensorImageDataset]:
    """The train and test splits of an idx data set (``display`` names it in messages), from the first
    of ``root/<tv_name>/raw``, ``root/<alias>``, ``root`` and ``system_dirs`` that holds all four files;
    downloaded with torchvision (class ``tv_name``) when ``download`` is set and none does."""
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
            f"{display} not found: no directory holds all of {', '.join(IDX_FILES.values())} "
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
