"""Image–text datasets: captioned images for contrastive (CLIP-style) pretraining.

Every dataset here yields ``(image, caption, label)``: ``image`` a ``uint8`` tensor ``[C, H, W]``,
``caption`` a ``str`` and ``label`` an ``int`` (``-1`` when unknown). Images are decoded exactly as
:class:`vfm.data.datasets.ImageFileDataset` decodes them (:func:`vfm.data.datasets.load_image`:
PIL, converted to ``in_chans``, shorter side resized to ``img_size``, centre crop), so batches
stack and the batched augmentation of :mod:`vfm.data.transforms` applies unchanged.

* :class:`ImageTextCSV` reads a CSV/TSV of image paths and captions (open_clip's format).
* :class:`WebDatasetShards` reads webdataset ``.tar`` shards *map-style*: the members' byte
  offsets are indexed once, and samples are read by seeking. Being a plain ``Dataset`` (not an
  ``IterableDataset``) it goes through :class:`vfm.data.loader.SeededBatchSampler` like every other
  dataset, so it is sharded across processes, shuffled, and resumed mid-epoch exactly.
* :class:`CaptionedDataset` turns a labelled dataset into image–text pairs with caption templates
  ("a photo of a {}."), optionally holding out classes for zero-shot experiments.

Bad data is skipped rather than fatal, but counted and logged (logger ``vfm.data``), and a data set
that is mostly bad fails at construction: rows/samples that are visibly broken (missing file,
missing or empty caption) are found when the dataset is built, and more than ``max_bad_fraction``
of them raises. Images that fail to *decode* are only found when read: the item is replaced by the
next good one (``(i + 1) % n``, deterministic, so every process and every resume sees the same
replacement) and counted.

The builders (:func:`image_text_csv`, :func:`webdataset`, :func:`captioned`) return a
:class:`vfm.data.datasets.DataSplits` and are the ``_target_`` of ``conf/dataset/*.yaml``.
"""

from __future__ import annotations

import csv
import glob
import io
import json
import logging
import os
import re
import tarfile
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from vfm.data.datasets import DECODE_ERRORS, IMAGENET_MEAN, IMAGENET_STD, DataSplits, _stats, benchmark, load_image
from vfm.data.prompts import CAPTION_TEMPLATES, FASHION_MNIST_CLASS_NAMES_NATURAL

__all__ = [
    "CaptionedDataset",
    "ImageTextCSV",
    "WebDatasetShards",
    "captioned",
    "expand_urls",
    "image_text_csv",
    "webdataset",
]

log = logging.getLogger("vfm.data")

# How many consecutive items __getitem__ tries before concluding the data is broken, not unlucky.
_MAX_DECODE_TRIES = 8
# How many offending rows/files an error or warning message lists.
_N_EXAMPLES = 5
# What a corrupt image (or caption bytes) can raise while being decoded (datasets.DECODE_ERRORS).
_DECODE_ERRORS = DECODE_ERRORS


def _check_common(img_size: int, in_chans: int, max_bad_fraction: float, who: str) -> None:
    if in_chans not in (1, 3):
        raise ValueError(f"{who}: in_chans must be 1 (grayscale) or 3 (RGB), got {in_chans}")
    if img_size < 1:
        raise ValueError(f"{who}: img_size must be positive, got {img_size}")
    if not 0.0 <= max_bad_fraction <= 1.0:
        raise ValueError(f"{who}: max_bad_fraction must be in [0, 1], got {max_bad_fraction}")


def _check_bad_count(source: str, n_bad: int, n_total: int, max_bad_fraction: float,
                     examples: Sequence[str], unit: str, fix: str) -> None:
    """Log the construction-time skips; raise when they exceed ``max_bad_fraction`` (or nothing is left)."""
    if n_bad == 0:
        return
    shown = "; ".join(examples[:_N_EXAMPLES]) + (" ..." if n_bad > len(examples[:_N_EXAMPLES]) else "")
    if n_bad >= n_total or n_bad > max_bad_fraction * n_total:
        raise ValueError(
            f"{source}: {n_bad} of {n_total} {unit} are unusable (more than max_bad_fraction={max_bad_fraction}); "
            f"first: {shown}. {fix}"
        )
    log.warning("%s: skipped %d of %d %s: %s", source, n_bad, n_total, unit, shown)


class _ImageTextBase(Dataset):
    """Shared ``__getitem__``: load item ``i``; on a decode failure use the next item and count it.

    Subclasses implement ``_load(i) -> (image, caption, label)``, ``_describe(i)`` (the offending
    file, for messages) and ``__len__``, and set ``source`` (the CSV or shard list, for messages).
    The failure count is per process: DataLoader workers each count their own.
    """

    source: str = ""

    def __init__(self) -> None:
        self.decode_failures = 0
        self.failed_items: list[str] = []  # the first few, for messages

    def _load(self, i: int) -> tuple[Tensor, str, int]:
        raise NotImplementedError

    def _describe(self, i: int) -> str:
        raise NotImplementedError

    def __getitem__(self, i: int) -> tuple[Tensor, str, int]:
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"index {i} out of range for {type(self).__name__} of length {n}")
        i %= n
        errors = []
        for t in range(min(_MAX_DECODE_TRIES, n)):
            j = (i + t) % n
            try:
                return self._load(j)
            except _DECODE_ERRORS as e:
                errors.append(f"{self._describe(j)} ({e})")
                self._count_failure(j, e, (j + 1) % n)
        raise RuntimeError(
            f"{self.source}: {len(errors)} consecutive items from index {i} failed to decode, so the data is "
            f"corrupt, not just an odd bad file: {'; '.join(errors[:_N_EXAMPLES])}. Check or rebuild the data set."
        )

    def _count_failure(self, j: int, error: BaseException, replacement: int) -> None:
        self.decode_failures += 1
        if len(self.failed_items) < _N_EXAMPLES:
            self.failed_items.append(self._describe(j))
        # Log the first few failures, then only at powers of two: a data set with many bad files
        # must not flood the log, but the count must keep appearing as it grows.
        c = self.decode_failures
        if c <= _N_EXAMPLES or c & (c - 1) == 0:
            log.warning(
                "%s: cannot decode %s (%s); using item %d instead. %d undecodable item(s) so far in this "
                "process (first: %s)",
                self.source, self._describe(j), error, replacement, c, ", ".join(self.failed_items),
            )


# --------------------------------------------------------------------------------------------
# CSV / TSV
# --------------------------------------------------------------------------------------------


class ImageTextCSV(_ImageTextBase):
    """Image paths and captions from a CSV/TSV file (open_clip's ``--train-data`` CSV format).

    open_clip's ``--csv-img-key filepath --csv-caption-key title --csv-separator "\\t"`` map to
    ``img_key``, ``caption_key`` and ``sep``; ``sep=None`` picks a tab for ``.tsv`` files and a
    comma otherwise. Relative image paths are relative to the CSV file's folder. Rows whose image
    file does not exist or whose caption is empty are skipped (counted and logged); more than
    ``max_bad_fraction`` of such rows raises. Items are ``(uint8 [in_chans, img_size, img_size],
    caption (stripped), -1)``.
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
    ) -> None:
        super().__init__()
        _check_common(img_size, in_chans, max_bad_fraction, "ImageTextCSV")
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
        _check_bad_count(
            str(self.path), len(bad), n_rows, max_bad_fraction, bad, "rows",
            "Fix the paths (relative paths are relative to the CSV's folder) or the captions, "
            "or raise dataset.max_bad_fraction.",
        )
        self.files, self.captions = files, captions
        self.skipped_rows = len(bad)

    def __len__(self) -> int:
        return len(self.files)

    def _describe(self, i: int) -> str:
        return self.files[i]

    def _load(self, i: int) -> tuple[Tensor, str, int]:
        image = load_image(self.files[i], resize=self.img_size, crop=self.img_size, in_chans=self.in_chans)
        return image, self.captions[i], -1

    def __repr__(self) -> str:
        return f"ImageTextCSV({self.path}, n={len(self)}, img_size={self.img_size}, in_chans={self.in_chans})"


# --------------------------------------------------------------------------------------------
# webdataset shards
# --------------------------------------------------------------------------------------------

_BRACES = re.compile(r"\{([^{}]*)\}")
_RANGE = re.compile(r"^(-?\d+)\.\.(-?\d+)$")
_GLOB_CHARS = re.compile(r"[*?\[]")
IMAGE_EXTS: tuple[str, ...] = ("jpg", "jpeg", "png", "webp")
_INDEX_FORMAT = "vfm-webdataset-index"
_INDEX_VERSION = 1
_INDEX_FIELDS = ("keys", "image", "text", "label", "num_keys", "num_bad", "bad_examples")


def _expand_braces(pattern: str) -> list[str]:
    """``a{000..002}b`` -> ``a000b a001b a002b``; ``{x,y}`` -> alternatives; left to right, not nested."""
    m = _BRACES.search(pattern)
    if m is None:
        return [pattern]
    head, body, rests = pattern[: m.start()], m.group(1), _expand_braces(pattern[m.end():])
    rng = _RANGE.match(body)
    if rng:
        a, b = rng.groups()
        lo, hi = int(a), int(b)
        # Zero-padded like the shard names (bash and braceexpand pad when a bound has a leading 0).
        width = max(len(a), len(b)) if (len(a) > 1 and a.startswith("0")) or (len(b) > 1 and b.startswith("0")) else 0
        step = 1 if hi >= lo else -1
        options = [str(v).zfill(width) for v in range(lo, hi + step, step)]
    elif "," in body:
        options = body.split(",")
    else:  # "{x}" is literal text, as in bash
        options = ["{" + body + "}"]
    return [head + o + r for o in options for r in rests]


def expand_urls(urls: str | Sequence[str]) -> list[str]:
    """Local shard paths from webdataset-style URLs: brace ranges (``shard-{000000..000009}.tar``),
    ``{a,b}`` alternatives, globs (``shards/*.tar``), several patterns joined by ``::`` or given as
    a list. Every path must exist; remote URLs (``http://``, ``pipe:``) are rejected."""
    patterns = [urls] if isinstance(urls, str) else [str(u) for u in urls]
    out: list[str] = []
    for pattern in (p for u in patterns for p in u.split("::") if p):
        if "://" in pattern or pattern.startswith("pipe:"):
            raise ValueError(
                f"webdataset: {pattern!r} is not a local file; only local .tar shards are supported "
                "(download them first, e.g. with `aws s3 sync` or `gsutil -m cp`)"
            )
        for path in _expand_braces(os.path.expanduser(pattern)):
            if _GLOB_CHARS.search(path):
                matches = sorted(glob.glob(path))
                if not matches:
                    raise FileNotFoundError(f"webdataset: the pattern {path!r} (from {pattern!r}) matches no file")
                out.extend(matches)
            else:
                out.append(path)
    if not out:
        raise ValueError(f"webdataset: no shard given (urls={urls!r})")
    missing = [p for p in out if not os.path.isfile(p)]
    if missing:
        raise FileNotFoundError(
            f"webdataset: {len(missing)} of {len(out)} shards do not exist, e.g. {missing[:3]}; "
            f"check dataset.urls={urls!r}"
        )
    return out


def _split_member(name: str) -> tuple[str, str] | None:
    """webdataset's grouping: key = name up to the first dot after the last '/', ext = the rest."""
    slash = name.rfind("/")
    dot = name.find(".", slash + 1)
    if dot <= slash + 1:  # no extension, or a hidden file (".DS_Store", "._x" macOS forks)
        return None
    return name[:dot], name[dot + 1 :].lower()


def _scan_shard(shard: str) -> dict[str, Any]:
    """Read the tar headers of one shard once; return its index (JSON-serialisable)."""
    if shard.endswith((".tar.gz", ".tgz", ".tar.bz2", ".tar.xz", ".tar.zst")):
        raise ValueError(
            f"webdataset: {shard} is compressed, and compressed tars cannot be read by seeking; "
            "decompress the shards (e.g. `gunzip`) and point dataset.urls at the .tar files"
        )
    groups: dict[str, dict[str, tuple[int, int]]] = {}  # insertion order = order in the tar
    try:
        # "r:" = uncompressed only: the recorded offsets must be byte offsets in the file itself.
        with tarfile.open(shard, mode="r:") as tf:
            for member in tf:
                if not member.isfile():
                    continue
                split = _split_member(member.name)
                if split is not None:
                    groups.setdefault(split[0], {})[split[1]] = (member.offset_data, member.size)
    except tarfile.TarError as e:
        raise ValueError(f"webdataset: {shard} is not a readable uncompressed tar file ({e}); re-create the shard") from e
    keys, image, text, label, bad = [], [], [], [], []
    with open(shard, "rb") as f:
        for key, members in groups.items():
            img_ext = next((e for e in IMAGE_EXTS if e in members), None)
            if img_ext is None:
                bad.append(f"{key}: no image ({'/'.join(IMAGE_EXTS)})")
                continue
            if "txt" not in members:
                bad.append(f"{key}: no caption (.txt)")
                continue
            try:  # captions are small and read here anyway to reject empty ones; .cls likewise
                if not _read(f, *members["txt"]).decode("utf-8").strip():
                    bad.append(f"{key}: empty caption")
                    continue
                cls = int(_read(f, *members["cls"]).decode("utf-8").strip()) if "cls" in members else -1
            except UnicodeDecodeError:
                bad.append(f"{key}: caption or label is not UTF-8 text")
                continue
            except EOFError:
                bad.append(f"{key}: member truncated (the shard ends early)")
                continue
            except ValueError:
                bad.append(f"{key}: .cls is not an integer")
                continue
            keys.append(key)
            image.append(list(members[img_ext]))
            text.append(list(members["txt"]))
            label.append(cls)
    return {"keys": keys, "image": image, "text": text, "label": label,
            "num_keys": len(groups), "num_bad": len(bad), "bad_examples": bad[:_N_EXAMPLES]}


def _read(f: BinaryIO, offset: int, size: int) -> bytes:
    f.seek(offset)
    data = f.read(size)
    if len(data) != size:
        raise EOFError(f"truncated shard: wanted {size} bytes at offset {offset}, got {len(data)}")
    return data


def _shard_index(shard: str) -> dict[str, Any]:
    """The shard's index from ``<shard>.idx.json`` if it is current, else scanned (and cached when writable)."""
    stat = os.stat(shard)
    stamp = {"format": _INDEX_FORMAT, "version": _INDEX_VERSION, "shard_size": stat.st_size,
             "shard_mtime_ns": stat.st_mtime_ns}
    cache = Path(shard + ".idx.json")
    try:
        cached = json.loads(cache.read_text())
        # A cache is only trusted for the exact file it was built from: a rewritten shard has a new size/mtime.
        if all(cached.get(k) == v for k, v in stamp.items()) and all(k in cached for k in _INDEX_FIELDS):
            return cached
    except (OSError, ValueError, AttributeError):
        pass  # absent, unreadable or not ours: rescan
    index = {**stamp, **_scan_shard(shard)}
    tmp = cache.with_name(f"{cache.name}.{os.getpid()}.tmp")
    try:
        # Write-then-rename: other ranks/processes indexing the same shard never read half a file.
        tmp.write_text(json.dumps(index))
        os.replace(tmp, cache)
    except OSError as e:  # read-only data set: fine, we just rescan next time
        log.debug("webdataset: not caching the index of %s (%s)", shard, e)
        tmp.unlink(missing_ok=True)
    return index


class WebDatasetShards(_ImageTextBase):
    """webdataset ``.tar`` shards read map-style: an index of member offsets, then one seek per read.

    A sample is the group of members sharing a key (the name up to the first dot after the last
    ``/``): an image (``jpg``/``jpeg``/``png``/``webp``), a caption (``txt``) and optionally an
    integer label (``cls``, else -1). Each shard's headers are scanned once with :mod:`tarfile` and
    the index is cached as ``<shard>.idx.json`` next to it when that folder is writable. Samples
    without an image or caption, or with an empty caption, are skipped and counted at index time;
    a shard where more than ``max_bad_fraction`` of the samples are bad raises.

    File handles are opened lazily and per process (a forked DataLoader worker must not share the
    parent's file offset), at most ``max_open_files`` at a time. The index lives in numpy arrays
    rather than Python lists so forked workers do not slowly copy it by touching refcounts.
    """

    def __init__(
        self,
        urls: str | Sequence[str],
        *,
        img_size: int = 224,
        in_chans: int = 3,
        max_bad_fraction: float = 0.1,
        max_open_files: int = 32,
    ) -> None:
        super().__init__()
        _check_common(img_size, in_chans, max_bad_fraction, "WebDatasetShards")
        self.shards = expand_urls(urls)
        self.source = self.shards[0] if len(self.shards) == 1 else f"{self.shards[0]} (+{len(self.shards) - 1} shards)"
        self.img_size, self.in_chans, self.max_open_files = img_size, in_chans, max(1, max_open_files)
        shard_id, keys, image, text, label = [], [], [], [], []
        skipped = 0
        for s, shard in enumerate(self.shards):
            idx = _shard_index(shard)
            if idx["num_keys"] == 0:
                raise ValueError(
                    f"webdataset: {shard} contains no samples (no member named <key>.<ext>); check dataset.urls"
                )
            _check_bad_count(
                shard, idx["num_bad"], idx["num_keys"], max_bad_fraction, idx["bad_examples"], "samples",
                "Every sample needs an image (.jpg/.jpeg/.png/.webp) and a non-empty .txt caption with the same "
                "key; fix or drop the shard, or raise dataset.max_bad_fraction.",
            )
            skipped += idx["num_bad"]
            shard_id.extend([s] * len(idx["keys"]))
            keys.extend(idx["keys"])
            image.extend(idx["image"])
            text.extend(idx["text"])
            label.extend(idx["label"])
        self.skipped_samples = skipped
        self._shard_id = np.asarray(shard_id, dtype=np.int32)
        self._keys = np.asarray([k.encode("utf-8") for k in keys], dtype=np.bytes_)
        self._image = np.asarray(image, dtype=np.int64).reshape(-1, 2)  # (offset, size)
        self._text = np.asarray(text, dtype=np.int64).reshape(-1, 2)
        self.labels = torch.as_tensor(np.asarray(label, dtype=np.int64))
        self._handles: OrderedDict[int, BinaryIO] = OrderedDict()
        self._pid = os.getpid()

    def __len__(self) -> int:
        return len(self._shard_id)

    def key(self, i: int) -> str:
        """The sample's webdataset key."""
        return self._keys[i].decode("utf-8")

    def _describe(self, i: int) -> str:
        return f"{self.shards[self._shard_id[i]]}:{self.key(i)}"

    def _file(self, s: int) -> BinaryIO:
        if os.getpid() != self._pid:
            # After fork the inherited handles share their file offset with the parent's: seeking
            # here would move the parent's reads. Drop them (closing our copy is harmless) and reopen.
            for f in self._handles.values():
                f.close()
            self._handles.clear()
            self._pid = os.getpid()
        f = self._handles.get(s)
        if f is None:
            if len(self._handles) >= self.max_open_files:
                self._handles.popitem(last=False)[1].close()
            f = self._handles[s] = open(self.shards[s], "rb")  # closed by the LRU, close() or __del__
        else:
            self._handles.move_to_end(s)
        return f

    def _load(self, i: int) -> tuple[Tensor, str, int]:
        f = self._file(int(self._shard_id[i]))
        data = _read(f, *self._image[i].tolist())
        caption = _read(f, *self._text[i].tolist()).decode("utf-8").strip()
        # PIL reads file objects as well as paths, so the shared decoder applies to member bytes.
        buf = io.BytesIO(data)
        try:
            image = load_image(buf, resize=self.img_size, crop=self.img_size, in_chans=self.in_chans)  # type: ignore[arg-type]
        except _DECODE_ERRORS as e:
            # The message would name "<_io.BytesIO object at 0x...>"; _describe() names the member instead.
            cause = e.__cause__ or e
            raise OSError(f"{type(cause).__name__}: {str(cause).replace(repr(buf), 'the image bytes')}") from e
        return image, caption, int(self.labels[i])

    def close(self) -> None:
        """Close the open shard files (they reopen on the next read)."""
        for f in self._handles.values():
            f.close()
        self._handles.clear()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass

    def __getstate__(self) -> dict[str, Any]:
        # Spawned workers get a pickled copy: file objects cannot be pickled, and reopen lazily.
        state = self.__dict__.copy()
        state["_handles"] = OrderedDict()
        return state

    def __repr__(self) -> str:
        return f"WebDatasetShards({len(self.shards)} shards, n={len(self)}, img_size={self.img_size}, in_chans={self.in_chans})"


# --------------------------------------------------------------------------------------------
# Captions from labels
# --------------------------------------------------------------------------------------------

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


# --------------------------------------------------------------------------------------------
# Builders (Hydra targets)
# --------------------------------------------------------------------------------------------


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
) -> DataSplits:
    """Image–text pairs from CSV/TSV files (:class:`ImageTextCSV`; open_clip's format).

    ``train`` reads ``train_csv``; ``val`` reads ``val_csv`` (held-out pairs, same columns) when
    given, else None; ``test`` is None. A plain CSV has no class labels (every label is -1), so
    ``num_classes`` must be 0 and the kNN / linear-probe evaluators cannot run on it: pass
    ``evaluator=[]`` and evaluate the checkpoint on a labelled dataset afterwards (``evaluate
    dataset=...``).
    """
    mean_t, std_t = _stats(mean, std, in_chans)
    if num_classes != 0:
        raise ValueError(
            f"dataset.num_classes must be 0 for image_text_csv (a CSV of captions has no labels), got {num_classes}"
        )
    kw = dict(img_key=img_key, caption_key=caption_key, sep=sep, img_size=img_size, in_chans=in_chans,
              max_bad_fraction=max_bad_fraction)
    train = ImageTextCSV(train_csv, **kw)  # type: ignore[arg-type]
    val = ImageTextCSV(val_csv, **kw) if val_csv else None  # type: ignore[arg-type]
    return DataSplits(train=train, val=val, test=None, img_size=img_size, in_chans=in_chans, mean=mean_t,
                      std=std_t, num_classes=0, class_names=[])


def webdataset(
    urls: str | Sequence[str],
    *,
    img_size: int = 224,
    in_chans: int = 3,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    max_bad_fraction: float = 0.1,
    num_classes: int = 0,
) -> DataSplits:
    """Image–text pairs from webdataset ``.tar`` shards (:class:`WebDatasetShards`), e.g.
    ``urls=/data/cc3m/shard-{000000..000331}.tar``.

    ``val``/``test`` are None, so the kNN / linear-probe evaluators need ``evaluator=[]`` (evaluate
    on a labelled dataset afterwards). ``num_classes`` > 0 declares that the shards' ``.cls`` labels
    are in ``[0, num_classes)``, which is checked; 0 means "no labels".
    """
    mean_t, std_t = _stats(mean, std, in_chans)
    if num_classes < 0:
        raise ValueError(f"dataset.num_classes must be >= 0, got {num_classes}")
    train = WebDatasetShards(urls, img_size=img_size, in_chans=in_chans, max_bad_fraction=max_bad_fraction)
    if num_classes and len(train.labels) and int(train.labels.max()) >= num_classes:
        raise ValueError(
            f"dataset.num_classes={num_classes} but the shards have .cls label {int(train.labels.max())}; "
            f"set dataset.num_classes={int(train.labels.max()) + 1}"
        )
    return DataSplits(train=train, val=None, test=None, img_size=img_size, in_chans=in_chans, mean=mean_t,
                      std=std_t, num_classes=num_classes, class_names=[])


def captioned(
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
    held_out_classes: Sequence[int] = (),
    templates: Sequence[str] | None = None,
    system_dirs: Sequence[str] | None = None,
) -> DataSplits:
    """A labelled benchmark (:func:`vfm.data.datasets.benchmark`, same arguments) with template
    captions on its training split, for image–text pretraining with a labelled evaluation.

    ``train`` is :class:`CaptionedDataset` over the benchmark's train split without the
    ``held_out_classes`` (so zero-shot accuracy on them measures transfer to unseen classes);
    ``val``/``test`` are the benchmark's labelled splits with *all* classes. ``class_names`` are
    readable names for prompts (:data:`vfm.data.prompts.FASHION_MNIST_CLASS_NAMES_NATURAL` for
    Fashion-MNIST, the benchmark's names otherwise). ``templates`` None means
    :data:`vfm.data.prompts.CAPTION_TEMPLATES`; the caption of a sample is fixed by ``seed``.
    """
    held = sorted({int(c) for c in held_out_classes})
    if held and (held[0] < 0 or held[-1] >= num_classes):
        raise ValueError(f"dataset.held_out_classes must be class indices in [0, {num_classes}), got {held}")
    if len(held) >= num_classes:
        raise ValueError(f"dataset.held_out_classes={held} holds out every class; keep at least one for training")
    splits = benchmark(variant=variant, root=root, download=download, val_fraction=val_fraction, seed=seed,
                       img_size=img_size, in_chans=in_chans, mean=mean, std=std, num_classes=num_classes,
                       system_dirs=system_dirs)
    names = list(FASHION_MNIST_CLASS_NAMES_NATURAL) if variant == "fashion_mnist" else list(splits.class_names)
    keep = [c for c in range(num_classes) if c not in held] if held else None
    train = CaptionedDataset(splits.train, names, CAPTION_TEMPLATES if templates is None else list(templates),
                             seed=seed, keep_classes=keep)
    return DataSplits(train=train, val=splits.val, test=splits.test, img_size=img_size, in_chans=in_chans,
                      mean=splits.mean, std=splits.std, num_classes=num_classes, class_names=names)


def synthetic_captions(*, class_names: Sequence[str] | None = None, templates: Sequence[str] | None = None,
                       **synthetic_kwargs: Any) -> DataSplits:
    """`vfm.data.datasets.synthetic` with template captions on its training split (tests, smoke runs)."""
    from vfm.data.datasets import synthetic

    splits = synthetic(**synthetic_kwargs)
    names = list(class_names) if class_names else [f"pattern {chr(ord('a') + i)}" for i in range(splits.num_classes)]
    if len(names) != splits.num_classes:
        raise ValueError(f"dataset.class_names has {len(names)} names for {splits.num_classes} classes")
    train = CaptionedDataset(splits.train, names, CAPTION_TEMPLATES if templates is None else list(templates))
    return DataSplits(train=train, val=splits.val, test=splits.test, img_size=splits.img_size, in_chans=splits.in_chans,
                      mean=splits.mean, std=splits.std, num_classes=splits.num_classes, class_names=names)
