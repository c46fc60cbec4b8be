"""Datasets with per-pixel class masks, for the dense evaluators (linear segmentation, attention
Jaccard): a folder of image + mask PNG pairs (:func:`segmentation_folder`, e.g. PASCAL VOC 2012 or
ADE20k), Fashion-MNIST with foreground masks made from pixel intensity
(:func:`benchmark_foreground`) and generated shapes for tests (:func:`synthetic_shapes`).

Every dataset here is a :class:`SegmentationDataset`: indexing yields ``(uint8 image [C, H, W],
int label)`` exactly like the classification datasets (so pretraining and the kNN / linear
evaluators run on it unchanged), and :meth:`~SegmentationDataset.pair` yields ``(image, uint8
mask [H, W])``: a class index per pixel, :data:`IGNORE_INDEX` (255) where the pixel is not scored.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from vfm.data.datasets.benchmarks import benchmark
from vfm.data.datasets.core import DatasetNotFoundError, DataSplits, TensorImageDataset, norm_stats, split_indices
from vfm.data.datasets.folders import IMG_EXTENSIONS, load_image

__all__ = [
    "ADE20K_CLASSES",
    "IGNORE_INDEX",
    "VOC_CLASSES",
    "FolderSegmentationDataset",
    "SegmentationDataset",
    "SegmentationSplits",
    "TensorSegmentationDataset",
    "benchmark_foreground",
    "foreground_masks",
    "segmentation_batches",
    "segmentation_folder",
    "synthetic_shapes",
]

IGNORE_INDEX = 255  # mmsegmentation's and PASCAL VOC's "not scored" label

# PASCAL VOC 2012 (Everingham et al. 2010): class index = palette index of SegmentationClass/*.png.
VOC_CLASSES = [
    "background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor",
]
# ADE20k SceneParsing (Zhou et al. 2017), the 150 classes of ADEChallengeData2016 in mmsegmentation's
# order; the PNGs store 0 for "other" and k for class k-1, hence reduce_zero_label.
ADE20K_CLASSES = (
    "wall building sky floor tree ceiling road bed windowpane grass cabinet sidewalk person earth door "
    "table mountain plant curtain chair car water painting sofa shelf house sea mirror rug field armchair "
    "seat fence desk rock wardrobe lamp bathtub railing cushion base box column signboard chest_of_drawers "
    "counter sand sink skyscraper fireplace refrigerator grandstand path stairs runway case pool_table "
    "pillow screen_door stairway river bridge bookcase blind coffee_table toilet flower book hill bench "
    "countertop stove palm kitchen_island computer swivel_chair boat bar arcade_machine hovel bus towel "
    "light truck tower chandelier awning streetlight booth television_receiver airplane dirt_track apparel "
    "pole land bannister escalator ottoman bottle buffet poster stage van ship fountain conveyer_belt "
    "canopy washer plaything swimming_pool stool barrel basket waterfall tent bag minibike cradle oven ball "
    "food step tank trade_name microwave pot animal bicycle lake dishwasher screen blanket sculpture hood "
    "sconce vase traffic_light tray ashcan fan pier crt_screen plate monitor bulletin_board shower radiator "
    "glass clock flag"
).split()
_CLASS_LISTS = {"voc": VOC_CLASSES, "ade20k": ADE20K_CLASSES}


class SegmentationDataset(Dataset, ABC):
    """A dataset whose items also have a class mask: ``pair(i) -> (uint8 [C, H, W], uint8 [H, W])``."""

    @abstractmethod
    def pair(self, i: int) -> tuple[Tensor, Tensor]:
        """Image ``i`` and its mask (class indices, :data:`IGNORE_INDEX` = not scored)."""


class TensorSegmentationDataset(TensorImageDataset, SegmentationDataset):
    """In memory: ``images`` uint8 ``[N, C, H, W]``, ``labels`` int64 ``[N]``, ``masks`` uint8 ``[N, H, W]``."""

    def __init__(self, images: Tensor, labels: Tensor, masks: Tensor) -> None:
        super().__init__(images, labels)
        if masks.dtype != torch.uint8 or masks.shape != (images.shape[0], *images.shape[2:]):
            raise ValueError(f"masks must be uint8 [N, H, W] matching images {tuple(images.shape)}, "
                             f"got {masks.dtype} {tuple(masks.shape)}")
        self.masks = masks

    def pair(self, i: int) -> tuple[Tensor, Tensor]:
        return self.images[i], self.masks[i]


@dataclass
class SegmentationSplits(DataSplits):
    """``DataSplits`` whose datasets are :class:`SegmentationDataset`; ``mask_classes`` names the
    mask's class indices (``num_classes`` / ``class_names`` stay the image-level labels, if any)."""

    mask_classes: list[str] = field(default_factory=list)
    ignore_index: int = IGNORE_INDEX


def segmentation_batches(dataset: Dataset, batch_size: int, limit: int | None = None,
                         num_workers: int = 0) -> Iterator[tuple[Tensor, Tensor]]:
    """``(uint8 images [B, C, H, W], uint8 masks [B, H, W])`` of the first ``limit`` items, in order.
    In-memory datasets are sliced; others are read through ``pair`` by a ``DataLoader``."""
    if not isinstance(dataset, SegmentationDataset):
        raise TypeError(f"{type(dataset).__name__} has no masks; use dataset=fashion_mnist_segmentation or "
                        f"dataset=segmentation_folder for the dense evaluators")
    n = len(dataset) if limit is None else min(limit, len(dataset))
    if isinstance(dataset, TensorSegmentationDataset):
        for i in range(0, n, batch_size):
            j = min(i + batch_size, n)
            yield dataset.images[i:j], dataset.masks[i:j]
        return
    pairs = _Pairs(dataset, n)
    yield from DataLoader(pairs, batch_size=batch_size, shuffle=False, num_workers=num_workers)


class _Pairs(Dataset):
    def __init__(self, dataset: SegmentationDataset, n: int) -> None:
        self.dataset, self.n = dataset, n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor]:
        return self.dataset.pair(i)


def foreground_masks(images: Tensor, labels: Tensor, threshold: int) -> Tensor:
    """uint8 ``[N, H, W]``: ``1 + label`` where any channel of the uint8 ``images [N, C, H, W]`` is
    ``> threshold``, else 0 (background)."""
    fg = images.amax(dim=1) > threshold
    return torch.where(fg, (labels + 1).view(-1, 1, 1).to(torch.uint8), torch.zeros((), dtype=torch.uint8))


def benchmark_foreground(*, threshold: int = 25, **kwargs: Any) -> SegmentationSplits:
    """A small benchmark (:func:`~vfm.data.datasets.benchmarks.benchmark`, e.g. Fashion-MNIST) with a
    mask per image: background 0, the object's pixels ``1 + label`` (``num_classes + 1`` mask
    classes). A pixel is foreground when its intensity (the brightest channel) is ``> threshold``
    of 255: for Fashion-MNIST the garment's silhouette, its darkest interior pixels counting as
    background. The splits, images and labels are exactly those of ``benchmark(**kwargs)``, so
    pretraining on it is pretraining on the benchmark."""
    if not 0 <= threshold < 255:
        raise ValueError(f"dataset.threshold must be in [0, 255), got {threshold}")
    splits = benchmark(**kwargs)

    def wrap(ds: TensorImageDataset | None) -> TensorSegmentationDataset | None:
        if ds is None:
            return None
        return TensorSegmentationDataset(ds.images, ds.labels, foreground_masks(ds.images, ds.labels, threshold))

    fields = {k: getattr(splits, k) for k in DataSplits.__dataclass_fields__}
    fields.update(train=wrap(splits.train), val=wrap(splits.val), test=wrap(splits.test))
    return SegmentationSplits(**fields, mask_classes=["background", *splits.class_names])


def synthetic_shapes(*, n_train: int = 64, n_val: int = 16, n_test: int = 16, img_size: int = 32,
                     in_chans: int = 3, num_classes: int = 2, seed: int = 0, mean: Sequence[float] = (0.5,),
                     std: Sequence[float] = (0.25,)) -> SegmentationSplits:
    """Generated images for tests: on a dark noisy background, one bright axis-aligned rectangle
    of a random size and place; the image's label is the shape id (``num_classes`` of them), which
    sets its colour (RGB) or brightness (grey), and the rectangle's pixels carry class
    ``1 + shape id``. Background is class 0."""
    num_shapes = num_classes
    g = torch.Generator().manual_seed(seed)

    def make(n: int) -> TensorSegmentationDataset:
        labels = torch.randint(0, num_shapes, (n,), generator=g)
        lo = torch.randint(0, img_size // 2, (n, 2), generator=g)
        size = torch.randint(img_size // 4, img_size // 2 + 1, (n, 2), generator=g)
        yy, xx = torch.arange(img_size).view(1, -1, 1), torch.arange(img_size).view(1, 1, -1)
        inside = ((yy >= lo[:, :1, None]) & (yy < (lo + size)[:, :1, None])
                  & (xx >= lo[:, 1:, None]) & (xx < (lo + size)[:, 1:, None]))
        level = 0.5 + 0.5 * (labels.float() + 1) / num_shapes  # in (0.5, 1]
        colour = level.view(-1, 1).expand(-1, in_chans).clone()
        if in_chans == 3:
            colour[:, 0] = 1.0 - 0.5 * labels.float() / max(num_shapes - 1, 1)
        x = 0.1 * torch.rand(n, in_chans, img_size, img_size, generator=g)
        x = torch.where(inside[:, None], colour[:, :, None, None], x)
        images = (x * 255).round().clamp(0, 255).to(torch.uint8)
        masks = torch.where(inside, (labels + 1).view(-1, 1, 1), 0).to(torch.uint8)
        return TensorSegmentationDataset(images, labels, masks)

    mean_t, std_t = norm_stats(mean, std, in_chans)
    return SegmentationSplits(
        train=make(n_train), val=make(n_val) if n_val else None, test=make(n_test) if n_test else None,
        img_size=img_size, in_chans=in_chans, mean=mean_t, std=std_t, num_classes=num_shapes,
        class_names=[f"shape{i}" for i in range(num_shapes)],
        mask_classes=["background", *(f"shape{i}" for i in range(num_shapes))],
    )


def load_mask(path: Path, *, size: int, reduce_zero_label: bool) -> Tensor:
    """A class-index PNG (mode ``P`` or ``L``: the pixel value is the class) to uint8 ``[size, size]``:
    shorter side to ``size`` with nearest-neighbour resampling, centre crop (the geometry of
    :func:`~vfm.data.datasets.folders.load_image`). ``reduce_zero_label``: 0 becomes
    :data:`IGNORE_INDEX`, :data:`IGNORE_INDEX` stays itself and every other value ``v`` becomes ``v - 1``
    (ADE20k's "other" = 0)."""
    from PIL import Image

    with Image.open(path) as file:
        if file.mode not in ("P", "L", "I", "I;16"):
            raise ValueError(f"mask {path} is a {file.mode} image; masks must store a class index per pixel "
                             f"(palette 'P' or grey 'L' PNG), not colours")
        file.load()
        img = file.copy()
    w, h = img.size
    scale = size / min(w, h)
    new_w, new_h = (size, max(size, round(h * scale))) if w <= h else (max(size, round(w * scale)), size)
    if (new_w, new_h) != (w, h):
        img = img.resize((new_w, new_h), Image.NEAREST)
    left, top = (new_w - size) // 2, (new_h - size) // 2
    mask = torch.from_numpy(np.asarray(img.crop((left, top, left + size, top + size))).astype(np.int64))
    if reduce_zero_label:
        # mmsegmentation's convention: 0 -> 255, v -> v - 1, and a pixel already ignored stays so
        mask = torch.where((mask == 0) | (mask == IGNORE_INDEX), IGNORE_INDEX, mask - 1)
    if bool((mask < 0).any()) or bool((mask > IGNORE_INDEX).any()):
        raise ValueError(f"mask {path} has values outside [0, 255]")
    return mask.to(torch.uint8)


class FolderSegmentationDataset(SegmentationDataset):
    """Image/mask file pairs decoded lazily; both resized (shorter side) and centre-cropped to
    ``img_size`` (bilinear for the image, nearest for the mask). Images have no label (-1)."""

    def __init__(self, pairs: Sequence[tuple[Path, Path]], *, img_size: int, in_chans: int,
                 reduce_zero_label: bool) -> None:
        self.pairs = list(pairs)
        self.img_size, self.in_chans, self.reduce_zero_label = img_size, in_chans, reduce_zero_label

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, i: int) -> tuple[Tensor, int]:
        image_path, _ = self.pairs[i]
        return load_image(image_path, resize=self.img_size, crop=self.img_size, in_chans=self.in_chans), -1

    def pair(self, i: int) -> tuple[Tensor, Tensor]:
        image_path, mask_path = self.pairs[i]
        image = load_image(image_path, resize=self.img_size, crop=self.img_size, in_chans=self.in_chans)
        return image, load_mask(mask_path, size=self.img_size, reduce_zero_label=self.reduce_zero_label)


def _folder_pairs(root: Path, image_dir: str, mask_dir: str, split: str, split_file: str | None) -> list[tuple[Path, Path]]:
    """(image, mask) paths matched by file stem; with ``split_file``, only the stems it lists."""
    images_at, masks_at = root / image_dir.format(split=split), root / mask_dir.format(split=split)
    for d, key in ((images_at, "image_dir"), (masks_at, "mask_dir")):
        if not d.is_dir():
            raise DatasetNotFoundError(f"segmentation_folder: {d} is not a directory; check dataset.root and dataset.{key}")
    images = {p.stem: p for p in sorted(images_at.iterdir()) if p.suffix.lower() in IMG_EXTENSIONS}
    masks = {p.stem: p for p in sorted(masks_at.iterdir()) if p.suffix.lower() == ".png"}
    if split_file is not None:
        listed = (root / split_file.format(split=split)).read_text().split()
        stems = [s for s in listed if s in masks]
    else:
        stems = sorted(masks)
    pairs = [(images[s], masks[s]) for s in stems if s in images]
    if not pairs:
        raise DatasetNotFoundError(f"segmentation_folder: no image in {images_at} has a mask of the same name in {masks_at}")
    return pairs


def segmentation_folder(
    *, root: str, classes: str | Sequence[str] = "voc", image_dir: str = "{split}/images",
    mask_dir: str = "{split}/masks", split_file: str | None = None, train_split: str = "train",
    test_split: str = "val", reduce_zero_label: bool = False, val_fraction: float = 0.1, seed: int = 0,
    img_size: int = 448, in_chans: int = 3, mean: Sequence[float] = (0.485, 0.456, 0.406),
    std: Sequence[float] = (0.229, 0.224, 0.225), num_classes: int = 0,
) -> SegmentationSplits:
    """Image + mask pairs under ``root``, matched by file stem (masks: PNG, one class index per pixel).

    ``image_dir`` / ``mask_dir`` / ``split_file`` are paths under ``root`` in which ``{split}`` is
    replaced by ``train_split`` or ``test_split``; ``split_file`` (optional) lists the stems of a
    split. ``val`` is a seeded ``val_fraction`` of the train pairs, ``test`` the ``test_split`` pairs.
    ``classes``: ``"voc"``, ``"ade20k"`` or a list of names (class ``i`` = ``classes[i]``).
    """
    if isinstance(classes, str):
        if classes not in _CLASS_LISTS:
            raise ValueError(f"dataset.classes={classes!r}: use one of {sorted(_CLASS_LISTS)} or a list of class names")
        classes = _CLASS_LISTS[classes]
    if len(classes) > IGNORE_INDEX:
        raise ValueError(f"dataset.classes has {len(classes)} names; at most {IGNORE_INDEX} (255 is the ignore index)")
    mean_t, std_t = norm_stats(mean, std, in_chans)
    base = Path(root)
    train_pairs = _folder_pairs(base, image_dir, mask_dir, train_split, split_file)
    test_pairs = _folder_pairs(base, image_dir, mask_dir, test_split, split_file)
    train_idx, val_idx = split_indices(len(train_pairs), val_fraction, seed)

    def make(pairs: Sequence[tuple[Path, Path]]) -> FolderSegmentationDataset:
        return FolderSegmentationDataset(pairs, img_size=img_size, in_chans=in_chans, reduce_zero_label=reduce_zero_label)

    return SegmentationSplits(
        train=make([train_pairs[i] for i in train_idx.tolist()]),
        val=make([train_pairs[i] for i in val_idx.tolist()]) if len(val_idx) else None,
        test=make(test_pairs), img_size=img_size, in_chans=in_chans, mean=mean_t, std=std_t,
        num_classes=num_classes, class_names=[], mask_classes=list(classes),
    )
