"""Image folders, decoded lazily with PIL: a class-subfolder tree (:func:`imagefolder`, e.g. ImageNet)
or every image under a folder (:func:`unlabeled_folder`). An undecodable file is handled by the
data set's bad-file policy (:mod:`vfm.data.datasets.bad_files`)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import BinaryIO

import numpy as np
import torch
from torch import Tensor

from vfm.data.datasets.bad_files import DECODE_ERRORS, BadFileDataset, ImageDecodeError, check_bad_files
from vfm.data.datasets.core import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    DatasetNotFoundError,
    DataSplits,
    norm_stats,
    split_indices,
)

__all__ = ["IMG_EXTENSIONS", "ImageFileDataset", "imagefolder", "load_image", "unlabeled_folder"]

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


def load_image(
    path: str | os.PathLike | BinaryIO, *, resize: int, crop: int, in_chans: int, name: str | None = None
) -> Tensor:
    """Decode one image file to uint8 ``[in_chans, crop, crop]``: shorter side to ``resize``, centre crop.

    ``path`` may also be an open binary file (e.g. the bytes of a tar member); ``name`` is what
    the error message calls the image (default: ``path``).

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
        # PIL names a file object by its repr ("<_io.BytesIO object at 0x...>"): say what it is instead.
        detail = str(e).replace(repr(path), "the image bytes") if name else str(e)
        raise ImageDecodeError(f"cannot decode image {name or path}: {type(e).__name__}: {detail}") from e
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


class ImageFileDataset(BadFileDataset):
    """Lazily decoded image files, each returned as ``(uint8 [C, crop, crop], label)``.

    Decoding follows the usual ImageNet recipe: the shorter side is resized to ``resize``
    (bilinear, PIL's antialiased resampling), then the centre ``crop x crop`` is taken. Using one
    fixed output size makes batches stackable; for pretraining ``crop == resize`` (``load_size``)
    and the multi-crop augmentation then samples its random resized crops from that square
    image, for evaluation ``crop == img_size`` (the standard "resize 256, centre-crop 224").

    ``bad_files`` ("skip" or "fail") is what an undecodable file does
    (:mod:`vfm.data.datasets.bad_files`: a skipped item is replaced by the next one, with that
    item's label, and counted in :attr:`num_skipped`).
    """

    source = "ImageFileDataset"

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
        super().__init__(bad_files)
        self.samples = list(samples)
        self.labels = torch.tensor([label for _, label in self.samples], dtype=torch.int64)
        self.resize = resize
        self.crop = crop
        self.in_chans = in_chans

    def __len__(self) -> int:
        return len(self.samples)

    def _load(self, i: int) -> tuple[Tensor, int]:
        path, label = self.samples[i]
        return load_image(path, resize=self.resize, crop=self.crop, in_chans=self.in_chans), label

    def __repr__(self) -> str:
        return (
            f"ImageFileDataset(n={len(self)}, resize={self.resize}, crop={self.crop}, in_chans={self.in_chans}, "
            f"bad_files={self.bad_files!r})"
        )


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
    check_bad_files(bad_files)
    mean_t, std_t = norm_stats(mean, std, in_chans)
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
    train_idx, val_idx = split_indices(len(samples), val_fraction, seed)
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
    check_bad_files(bad_files)
    mean_t, std_t = norm_stats(mean, std, in_chans)
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
