"""Image–text pairs from a CSV/TSV of image paths and captions (open_clip's ``--train-data`` format)."""

from __future__ import annotations

import csv
import os
from collections.abc import Sequence
from pathlib import Path

from torch import Tensor

from vfm.data.datasets import IMAGENET_MEAN, IMAGENET_STD, DataSplits, LazyImageDataset, norm_stats
from vfm.data.image_text.checks import check_bad_count, check_common, yields_captions

__all__ = ["ImageTextCSV", "image_text_csv"]


class ImageTextCSV(LazyImageDataset):
    """Image paths and captions from a CSV/TSV file (open_clip's ``--train-data`` CSV format).

    open_clip's ``--csv-img-key filepath --csv-caption-key title --csv-separator "\\t"`` map to
    ``img_key``, ``caption_key`` and ``sep``; ``sep=None`` picks a tab for ``.tsv`` files and a
    comma otherwise. Relative image paths are relative to the CSV file's folder. Rows whose image
    file does not exist or whose caption is empty are skipped (counted and logged); more than
    ``max_bad_fraction`` of such rows raises. Items are ``(uint8 [in_chans, img_size, img_size],
    caption (stripped), -1)``: shorter side resized to ``img_size``, centre crop. With
    ``whole_for_training`` the training loader reads whole images instead (shorter side at most
    ``img_size``, :meth:`~vfm.data.datasets.LazyImageDataset.for_training`), so the crops come from
    all of each image as open_clip's ``RandomResizedCrop`` does. An image that fails to decode
    when read is handled by ``bad_files`` (:mod:`vfm.data.datasets.bad_files`: "skip" replaces it
    by the next item and counts it).
    """

    def __init__(
        self,
        path: str | os.PathLike,
        *,
        img_key: str = "filepath",
        caption_key: str = "title",
        sep: str | None = None,
        img_size: int = 224,
        in_chans: int = 3,
        max_bad_fraction: float = 0.1,
        bad_files: str = "skip",
        whole_for_training: bool = False,
    ) -> None:
        check_common(img_size, in_chans, max_bad_fraction, "ImageTextCSV")
        super().__init__(resize=img_size, crop=img_size, in_chans=in_chans, bad_files=bad_files,
                         whole_for_training=whole_for_training)
        self.path = Path(path)
        self.source = str(self.path)
        if not self.path.is_file():
            raise FileNotFoundError(f"ImageTextCSV: {self.path} does not exist; pass the path of a CSV/TSV file")
        if sep is None:
            sep = "\t" if self.path.suffix.lower() == ".tsv" else ","
        elif sep == "\\t":  # open_clip's `--csv-separator "\t"` reaches us as backslash + t from a shell
            sep = "\t"
        if len(sep) != 1:
            raise ValueError(f"ImageTextCSV: sep must be a single character, got {sep!r} (a tab is '\\t')")
        self.img_size, self.in_chans = img_size, in_chans
        base = self.path.parent
        files: list[str] = []
        captions: list[str] = []
        bad: list[str] = []
        n_rows = 0
        # utf-8-sig: a byte-order mark (spreadsheet exports) would otherwise stick to the first column name.
        with open(self.path, newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f, delimiter=sep)
            columns = reader.fieldnames or []
            if not columns:
                raise ValueError(f"ImageTextCSV: {self.path} is empty; it needs a header row naming its columns")
            missing = [k for k in (img_key, caption_key) if k not in columns]
            if missing:
                hint = ""
                if len(columns) == 1:
                    hint = f" Only one column was found: is the separator right (sep={sep!r})?"
                raise ValueError(
                    f"ImageTextCSV: {self.path} has no column {' or '.join(repr(k) for k in missing)}; its columns "
                    f"are {columns}. Set img_key/caption_key (dataset.img_key, dataset.caption_key) to the "
                    f"right column names.{hint}"
                )
            for row in reader:
                n_rows += 1
                where = f"line {reader.line_num}"
                rel, caption = row.get(img_key) or "", (row.get(caption_key) or "").strip()
                file = base / rel.strip() if rel.strip() else None
                if file is None or not file.is_file():
                    bad.append(f"{where}: image {str(file) if file else '(empty path)'} not found")
                elif not caption:
                    bad.append(f"{where}: empty caption")
                else:
                    files.append(str(file))
                    captions.append(caption)
        if n_rows == 0:
            raise ValueError(f"ImageTextCSV: {self.path} has a header but no rows")
        check_bad_count(
            str(self.path), len(bad), n_rows, max_bad_fraction, bad, "rows",
            "Fix the paths (relative paths are relative to the CSV's folder) or the captions, "
            "or raise dataset.max_bad_fraction.",
        )
        self.files, self.captions = files, captions
        self.skipped_rows = len(bad)

    def __len__(self) -> int:
        return len(self.files)

    def _load(self, i: int) -> tuple[Tensor, str, int]:
        return self._decode(self.files[i]), self.captions[i], -1

    def __repr__(self) -> str:
        return (f"ImageTextCSV({self.path}, n={len(self)}, img_size={self.img_size}, in_chans={self.in_chans}, "
                f"whole_for_training={self.whole_for_training})")


@yields_captions
def image_text_csv(
    train_csv: str,
    val_csv: str | None = None,
    *,
    img_size: int = 224,
    in_chans: int = 3,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    img_key: str = "filepath",
    caption_key: str = "title",
    sep: str | None = None,
    max_bad_fraction: float = 0.1,
    num_classes: int = 0,
    bad_files: str = "skip",
    whole_images: bool = True,
) -> DataSplits:
    """Image–text pairs from CSV/TSV files (:class:`ImageTextCSV`; open_clip's format).

    ``train`` reads ``train_csv``; ``val`` reads ``val_csv`` (held-out pairs, same columns) when
    given, else None; ``test`` is None. Both are ``img_size`` squares (shorter side resized, centre
    crop: open_clip's evaluation view); training crops from the whole images of ``train_csv``
    (``whole_images``), or with ``whole_images=False`` from that centre square. A plain CSV has no class labels (every label is -1), so
    ``num_classes`` must be 0 and the kNN / linear-probe evaluators cannot run on it: pass
    ``evaluator=[]`` and evaluate the checkpoint on a labelled dataset afterwards (``evaluate
    dataset=...``).
    """
    mean_t, std_t = norm_stats(mean, std, in_chans)
    if num_classes != 0:
        raise ValueError(
            f"dataset.num_classes must be 0 for image_text_csv (a CSV of captions has no labels), got {num_classes}"
        )
    kw = dict(img_key=img_key, caption_key=caption_key, sep=sep, img_size=img_size, in_chans=in_chans,
              max_bad_fraction=max_bad_fraction, bad_files=bad_files)
    train = ImageTextCSV(train_csv, **kw, whole_for_training=whole_images)  # type: ignore[arg-type]
    val = ImageTextCSV(val_csv, **kw) if val_csv else None  # type: ignore[arg-type]
    return DataSplits(train=train, val=val, test=None, img_size=img_size, in_chans=in_chans, mean=mean_t,
                      std=std_t, num_classes=0, class_names=[])
