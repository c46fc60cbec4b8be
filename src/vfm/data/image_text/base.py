"""What the image–text datasets share: argument checks, the construction-time bad-row count, and the
read-time policy for undecodable images (:class:`ImageTextDataset`)."""

from __future__ import annotations

import logging
from collections.abc import Sequence

from torch import Tensor
from torch.utils.data import Dataset

from vfm.data.datasets import DECODE_ERRORS

__all__ = ["N_EXAMPLES", "ImageTextDataset", "check_bad_count", "check_common"]

log = logging.getLogger("vfm.data")

# How many consecutive items __getitem__ tries before concluding the data is broken, not unlucky.
_MAX_DECODE_TRIES = 8
# How many offending rows/files an error or warning message lists.
N_EXAMPLES = 5


def check_common(img_size: int, in_chans: int, max_bad_fraction: float, who: str) -> None:
    """One-line errors for the arguments every image–text dataset takes."""
    if in_chans not in (1, 3):
        raise ValueError(f"{who}: in_chans must be 1 (grayscale) or 3 (RGB), got {in_chans}")
    if img_size < 1:
        raise ValueError(f"{who}: img_size must be positive, got {img_size}")
    if not 0.0 <= max_bad_fraction <= 1.0:
        raise ValueError(f"{who}: max_bad_fraction must be in [0, 1], got {max_bad_fraction}")


def check_bad_count(source: str, n_bad: int, n_total: int, max_bad_fraction: float,
                     examples: Sequence[str], unit: str, fix: str) -> None:
    """Log the construction-time skips; raise when they exceed ``max_bad_fraction`` (or nothing is left)."""
    if n_bad == 0:
        return
    shown = "; ".join(examples[:N_EXAMPLES]) + (" ..." if n_bad > len(examples[:N_EXAMPLES]) else "")
    if n_bad >= n_total or n_bad > max_bad_fraction * n_total:
        raise ValueError(
            f"{source}: {n_bad} of {n_total} {unit} are unusable (more than max_bad_fraction={max_bad_fraction}); "
            f"first: {shown}. {fix}"
        )
    log.warning("%s: skipped %d of %d %s: %s", source, n_bad, n_total, unit, shown)


class ImageTextDataset(Dataset):
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
            except DECODE_ERRORS as e:
                errors.append(f"{self._describe(j)} ({e})")
                self._count_failure(j, e, (j + 1) % n)
        raise RuntimeError(
            f"{self.source}: {len(errors)} consecutive items from index {i} failed to decode, so the data is "
            f"corrupt, not just an odd bad file: {'; '.join(errors[:N_EXAMPLES])}. Check or rebuild the data set."
        )

    def _count_failure(self, j: int, error: BaseException, replacement: int) -> None:
        self.decode_failures += 1
        if len(self.failed_items) < N_EXAMPLES:
            self.failed_items.append(self._describe(j))
        # Log the first few failures, then only at powers of two: a data set with many bad files
        # must not flood the log, but the count must keep appearing as it grows.
        c = self.decode_failures
        if c <= N_EXAMPLES or c & (c - 1) == 0:
            log.warning(
                "%s: cannot decode %s (%s); using item %d instead. %d undecodable item(s) so far in this "
                "process (first: %s)",
                self.source, self._describe(j), error, replacement, c, ", ".join(self.failed_items),
            )
