"""Image folders, decoded lazily with PIL: a class-subfolder tree (:func:`imagefolder`, e.g. ImageNet)
or every image under a folder (:func:`unlabeled_folder`). An undecodable file is handled by the
data set's bad-file policy (:mod:`vfm.data.datasets.bad_files`)."""

from __future__ import annotations

import copy
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

__all__ = [
    "IMG_EXTENSIONS",
    "MAX_ASPECT",
    "ImageFileDataset",
    "LazyImageDataset",
    "imagefolder",
    "load_image",
    "unlabeled_folder",
]

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


# A whole training image keeps its aspect ratio up to this long / short side ratio (the few wider
# ones are shrunk to fit), which bounds the batch canvas (:func:`vfm.data.collate.stack_images`).
MAX_ASPECT = 2.0


def load_image(
    path: str | os.PathLike | BinaryIO, *, resize: int, crop: int | None, in_chans: int, name: str | None = None
) -> Tensor:
    """Decode one image file to uint8 ``[in_chans, crop, crop]``: shorter side to ``resize``, centre crop
    (the evaluation view: DeiT, DINO and MAE evaluate on ``Resize(256, bicubic)``, ``CenterCrop(224)``).

    ``crop=None`` keeps the whole image ``[in_chans, h, w]`` (the training view: random resized
    crops are drawn from all of it): shrunk, aspect ratio kept, only as far as needed for the
    shorter side to be at most ``resize`` and the longer at most ``MAX_ASPECT * resize``; smaller
    images stay as they are. Resampling is PIL's bicubic, antialiased when shrinking.

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
    if crop is None:
        scale = min(1.0, resize / min(w, h), MAX_ASPECT * resize / max(w, h))
        new_w, new_h = max(1, round(w * scale)), max(1, round(h * scale))
    else:
        scale = resize / min(w, h)
        # Shorter side exactly `resize`, the longer one rounded (so the crop always fits).
        new_w, new_h = (resize, max(resize, round(h * scale))) if w <= h else (max(resize, round(w * scale)), resize)
    if (new_w, new_h) != (w, h):
        img = img.resize((new_w, new_h), Image.BICUBIC)
    if crop is not None:
        left, top = (new_w - crop) // 2, (new_h - crop) // 2
        img = img.crop((left, top, left + crop, top + crop))
    array = np.asarray(img, dtype=np.uint8)
    if array.ndim == 2:
        array = array[:, :, None]
    return torch.from_numpy(array.copy()).permute(2, 0, 1).contiguous()


class LazyImageDataset(BadFileDataset):
    """Image files decoded when read (:func:`load_image`), in two views.

    The evaluation view: shorter side resized to ``resize`` (bicubic, PIL's antialiased
    resampling), then the centre ``crop x crop``. With ``whole_for_training``,
    :meth:`for_training` (what the training loader reads) returns the training view: whole images
    of their own size (``crop=None``, see :func:`load_image`), so the random resized crops cover
    all of each image, edges included, as torchvision's ``RandomResizedCrop`` does on the decoded
    file in the official recipes.

    Subclasses list their files, implement ``__len__`` and ``_load(i)`` and decode with
    :meth:`_decode`; ``bad_files`` ("skip" or "fail") is what an undecodable file does
    (:mod:`vfm.data.datasets.bad_files`).
    """

    def __init__(
        self, *, resize: int, crop: int | None, in_chans: int, bad_files: str = "skip", whole_for_training: bool = False
    ) -> None:
        who = type(self).__name__
        if in_chans not in (1, 3):
            raise ValueError(f"{who}: in_chans must be 1 or 3, got {in_chans}")
        if crop is not None and not 0 < crop <= resize:
            raise ValueError(f"{who}: need 0 < crop <= resize, got crop={crop}, resize={resize}")
        super().__init__(bad_files)
        self.resize = resize
        self.crop = crop
        self.in_chans = in_chans
        self.whole_for_training = whole_for_training

    def for_training(self) -> LazyImageDataset:
        """The view training reads: whole images when ``whole_for_training`` (a shallow copy with
        ``crop=None``), else this data set."""
        if not self.whole_for_training or self.crop is None:
            return self
        view = copy.copy(self)
        view.crop = None
        return view

    def _decode(self, file: str | os.PathLike | BinaryIO, name: str | None = None) -> Tensor:
        """One image in this data set's view: ``[in_chans, crop, crop]``, or whole when ``crop`` is None."""
        return load_image(file, resize=self.resize, crop=self.crop, in_chans=self.in_chans, name=name)


class ImageFileDataset(LazyImageDataset):
    """Lazily decoded image files, each returned as ``(uint8 [C, crop, crop], label)``.

    Decoding follows the usual ImageNet evaluation recipe: the shorter side is resized to
    ``resize``, then the centre ``crop x crop`` is taken ("resize 256, centre-crop 224" with
    ``crop == img_size``; the ``train`` split of the folder datasets keeps ``crop == resize ==
    load_size`` for the evaluators' features). ``whole_for_training``: training reads whole
    images (:class:`LazyImageDataset`).

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
        crop: int | None,
        in_chans: int,
        bad_files: str = "skip",
        whole_for_training: bool = False,
    ) -> None:
        super().__init__(resize=resize, crop=crop, in_chans=in_chans, bad_files=bad_files,
                         whole_for_training=whole_for_training)
        self.samples = list(samples)
        self.labels = torch.tensor([label for _, label in self.samples], dtype=torch.int64)

    def __len__(self) -> int:
        return len(self.samples)

    def _load(self, i: int) -> tuple[Tensor, int]:
        path, label = self.samples[i]
        return self._decode(path), label

    def __repr__(self) -> str:
        return (
            f"ImageFileDataset(n={len(self)}, resize={self.resize}, crop={self.crop}, in_chans={self.in_chans}, "
            f"whole_for_training={self.whole_for_training}, "
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
    whole_images: bool = True,
) -> DataSplits:
    """A class-subfolder tree (``root/train/<class>/**/img``), e.g. ImageNet, decoded lazily.

    ``train`` images are ``load_size`` squares (shorter side resized to ``load_size``, centre
    crop) for the evaluators; training crops its random views from the whole image (shorter side
    at most ``load_size``, :meth:`ImageFileDataset.for_training`), or with ``whole_images=False``
    from that centre square. ``val`` (a seeded ``val_fraction`` of
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
        bad_files=bad_files, whole_for_training=whole_images,
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
    whole_images: bool = True,
) -> DataSplits:
    """Every image anywhere under ``root`` (recursive), unlabelled (label -1), for pretraining only.

    Images are ``load_size`` squares, and training crops from whole images (``whole_images``),
    as in :func:`imagefolder`; ``val``/``test`` are None.
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
                             bad_files=bad_files, whole_for_training=whole_images)
    return DataSplits(train=train, val=None, test=None, img_size=img_size, in_chans=in_chans, mean=mean_t,
                      std=std_t, num_classes=0, class_names=[])
