"""Seeded random-number contexts: run a block on seeded global generators, then restore the
caller's. Libraries that draw from global state (timm's Mixup and RandAugment use NumPy's and
Python's global generators; drop path uses torch's) become reproducible per batch without
perturbing the training process's own streams.
"""

from __future__ import annotations

import contextlib
import random
from collections.abc import Iterator
from typing import Any

import numpy as np

#: The Python and NumPy global generator states (`random.getstate()`, `np.random.get_state()`).
GlobalRngState = tuple[tuple[Any, ...], tuple[Any, ...]]


def _set_state(state: GlobalRngState) -> None:
    py, npy = state
    # Rebuilt field by field: a batch's trip through pin_memory / a device move may have turned
    # the tuples into lists, which random.setstate rejects.
    random.setstate((int(py[0]), tuple(int(v) for v in py[1]), py[2]))
    np.random.set_state((str(npy[0]), np.asarray(npy[1], dtype=np.uint32), int(npy[2]), int(npy[3]), float(npy[4])))


@contextlib.contextmanager
def global_rng(*, seed: int | None = None, state: GlobalRngState | None = None) -> Iterator[None]:
    """Run a block on Python's and NumPy's global generators seeded with `seed` (or set to
    `state`), then put back what was there."""
    saved = random.getstate(), np.random.get_state()
    try:
        if state is not None:
            _set_state(state)
        elif seed is not None:
            random.seed(seed)
            np.random.seed(seed % 2**32)
        yield
    finally:
        random.setstate(saved[0])
        np.random.set_state(saved[1])


def global_rng_state() -> GlobalRngState:
    return random.getstate(), np.random.get_state()
