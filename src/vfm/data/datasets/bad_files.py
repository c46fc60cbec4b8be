"""The bad-file policy of every lazily decoded dataset: what an undecodable file does to a run.

A file that cannot be decoded (truncated, empty, not an image) is only found when it is read,
possibly hours into a run. ``bad_files="fail"`` stops with :class:`ImageDecodeError` naming the
file. ``bad_files="skip"`` (the default) returns the next item instead (``(i + 1) % n``, then
``i + 2``, ...): deterministic, so batches keep their size, every process agrees and a resumed
run sees the same data. Every skip is logged (logger ``vfm.data``: the first few, then at powers
of two) and counted in :attr:`BadFileDataset.num_skipped`, one count over the main process and all
its DataLoader workers; :data:`MAX_CONSECUTIVE_BAD` failures in a row raise ``RuntimeError``,
because then the data set (or its mount) is broken, not sprinkled with odd bad files.

:class:`BadFileDataset` implements this once; the folder datasets
(:class:`vfm.data.datasets.ImageFileDataset`) and the image–text datasets
(:mod:`vfm.data.image_text`) derive from it.
"""

from __future__ import annotations

import logging
import operator
from typing import Any

import torch
from torch.utils.data import Dataset, get_worker_info

__all__ = [
    "BAD_FILE_POLICIES",
    "DECODE_ERRORS",
    "MAX_CONSECUTIVE_BAD",
    "BadFileDataset",
    "ImageDecodeError",
    "check_bad_files",
]

log = logging.getLogger("vfm.data")

# What a corrupt image can raise while being decoded: PIL raises OSError (UnidentifiedImageError,
# truncated files), but also ValueError/SyntaxError/EOFError from some plugins, and
# DecompressionBombError (an Exception subclass) for absurd sizes.
try:
    from PIL.Image import DecompressionBombError as _BombError
except ImportError:  # pragma: no cover - very old Pillow
    _BombError = OSError  # type: ignore[assignment,misc]
DECODE_ERRORS: tuple[type[BaseException], ...] = (OSError, ValueError, SyntaxError, EOFError, _BombError)

# What a lazily decoded dataset does with an undecodable file (dataset.bad_files).
BAD_FILE_POLICIES: tuple[str, ...] = ("skip", "fail")
# How many consecutive undecodable items "skip" tolerates before concluding that the data (or its
# mount) is broken rather than sprinkled with odd bad files.
MAX_CONSECUTIVE_BAD = 16
# How many skips are always logged; after that only every power of two (the log must not flood,
# but the growing count must keep appearing).
_N_LOGGED = 5
# Slots of the shared skip counter: one per DataLoader worker (+1 for the main process), so each
# slot has a single writer and no increment is lost to a race between processes.
_COUNTER_SLOTS = 257


class ImageDecodeError(OSError):
    """One image file cannot be read or decoded (truncated, empty, not an image); the message names it.

    An ``OSError`` (what PIL raises for most broken files), so ``except OSError`` still catches it;
    its own class lets :class:`BadFileDataset` skip exactly the decode failures and nothing else.
    """


def check_bad_files(bad_files: str) -> None:
    """Raise a one-line ``ValueError`` naming ``dataset.bad_files`` unless it is a known policy."""
    if bad_files not in BAD_FILE_POLICIES:
        raise ValueError(
            f"dataset.bad_files must be one of {', '.join(repr(p) for p in BAD_FILE_POLICIES)}, got {bad_files!r} "
            "('skip': replace an undecodable image by the next item and count it; 'fail': stop with an error)"
        )


class BadFileDataset(Dataset):
    """A map-style dataset whose items are decoded when read, under the bad-file policy above.

    Subclasses implement ``__len__`` and ``_load(i)``, which returns item ``i`` or raises
    :class:`ImageDecodeError` naming the bad file; ``source`` names the data in messages.
    Any other exception is a bug, not a bad file, and propagates.
    """

    source: str = ""

    def __init__(self, bad_files: str = "skip") -> None:
        check_bad_files(bad_files)
        self.bad_files = bad_files
        # Skip counts in shared memory, created here so that DataLoader workers write into the
        # same storage the main process reads: fork inherits the mapping, and spawn pickles the
        # dataset with torch's reductions, which pass shared storage by handle, not by copy.
        # One slot per worker (see _slot) keeps every increment race-free without a lock.
        self._skips = torch.zeros(_COUNTER_SLOTS, dtype=torch.int64).share_memory_()

    def _load(self, i: int) -> tuple[Any, ...]:
        raise NotImplementedError

    def __len__(self) -> int:
        raise NotImplementedError

    @property
    def num_skipped(self) -> int:
        """How many times an undecodable file was replaced, summed over this process and its DataLoader workers.

        A skip event per failed read: a bad file read in two epochs counts twice, and item ``i``
        replaced by a bad ``i + 1`` counts both.
        """
        return int(self._skips.sum())

    def __getitem__(self, i: int) -> tuple[Any, ...]:
        n = len(self)
        i = operator.index(i)
        if not -n <= i < n:
            raise IndexError(f"index {i} out of range for {type(self).__name__} of length {n}")
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
        for t in range(min(MAX_CONSECUTIVE_BAD, n)):
            j = (i + t) % n
            try:
                return self._load(j)
            except ImageDecodeError as e:
                errors.append(str(e))
                self._count_skip(e, (j + 1) % n)
        raise RuntimeError(
            f"{self.source}: {len(errors)} consecutive items from index {i} failed to decode, so the data looks "
            f"corrupt, not just an odd bad file: {'; '.join(errors[:_N_LOGGED])}. Check the files (is the disk or "
            "mount healthy?), or rebuild the data set."
        )

    @staticmethod
    def _slot() -> int:
        """This process's counter slot: 0 in the main process, ``1 + worker id`` in a DataLoader worker."""
        info = get_worker_info()
        return 0 if info is None else 1 + info.id % (_COUNTER_SLOTS - 1)

    def _count_skip(self, error: ImageDecodeError, replacement: int) -> None:
        self._skips[self._slot()] += 1
        c = self.num_skipped
        if c <= _N_LOGGED or c & (c - 1) == 0:
            log.warning(
                "%s: %s; using item %d instead (dataset.bad_files=skip). %d undecodable image(s) skipped so far",
                self.source, error, replacement, c,
            )
