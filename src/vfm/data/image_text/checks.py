"""Construction-time checks of the image–text datasets: their common arguments, and the rows or
samples found broken while indexing (more than ``max_bad_fraction`` of them raises).

Images that fail to decode when read are the business of the one bad-file policy,
:mod:`vfm.data.datasets.bad_files`."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import TypeVar

__all__ = ["N_EXAMPLES", "check_bad_count", "check_common", "yields_captions"]

log = logging.getLogger("vfm.data")

_F = TypeVar("_F", bound=Callable)


def yields_captions(builder: _F) -> _F:
    """Mark a dataset builder whose splits yield `(image, caption, label)`, what CLIP trains on;
    config validation reads the mark before any data is read (`vfm.config.dataset_yields_captions`)."""
    builder.yields_captions = True  # type: ignore[attr-defined]
    return builder


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
