"""The seeded, resumable batch sampler: augmentation randomness belongs to the batch, not to the worker.

Exact resume and run-to-run reproducibility need every random augmentation parameter to be a
function of *which batch this is*, not of which worker process built it or how many batches that
worker built before. Elastic resume (a run stopped on N processes continues on M) needs the data
order to be a function of the global batch alone, not of the process count. So:

* every epoch has one **global order** (a permutation from ``seed + epoch``) cut into consecutive
  **chunks** of ``batch_size`` indices; chunk ``k`` carries one seed, ``batch_seed(seed, epoch,
  k)``. Process ``rank`` of ``world_size`` takes chunks ``rank, rank + world_size, ...``: its
  ``b``-th batch is chunk ``b * world_size + rank``. So optimisation step ``s`` (``accum_steps``
  micro-batches on every process) consumes the global order's positions ``[s * G, (s + 1) * G)``,
  ``G = batch_size * world_size * accum_steps``, whatever the split of ``G``
  (:class:`SeededBatchSampler`);
* :class:`SeededDataset` passes the chunk's seed through next to ``(image, label)`` (or any item
  tuple, e.g. ``(image, caption, label)`` of :mod:`vfm.data.image_text`);
* the collate (:mod:`vfm.data.collate`) stacks the uint8 images and runs the batched augmentation
  with ``torch.Generator().manual_seed(batch_seed)``.

Repeated augmentation (DeiT's ``RASampler``, Hoffer et al. 2020): with ``repeats = r > 1`` the
global order is the epoch's permutation with every index written ``r`` times in a row, cut to
the dataset's length, so an epoch still has ``dataset_len`` samples (about ``dataset_len / r``
distinct images, each ``r`` times with its own augmentation). That is the order DeiT's
``RASampler`` deals out, so a global batch holds the same samples; DeiT deals position ``p`` to
process ``p mod W`` (the ``r`` copies of an image land on ``r`` different processes), here the
copies usually share a process's chunk, which only matters for per-process operations (Mixup
pairs the batch with its reverse).

The result: the same batch gets the same crops with ``num_workers`` 0 or 8; resuming at
``(epoch, start_batch)`` replays exactly the batches an uninterrupted run would have seen; and a
run resumed with another process count (same global batch) continues at the same sample. The
crops of a sample depend on its chunk, so they are also the same there when the per-process
batch (``G / (processes x accum_steps)``) is.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

__all__ = ["SeededBatchSampler", "SeededDataset", "batch_seed"]


def batch_seed(seed: int, epoch: int, batch_index: int) -> int:
    """A 63-bit seed for chunk ``batch_index`` of ``epoch``, well mixed from its coordinates (numpy
    ``SeedSequence``).

    Hashing rather than e.g. ``seed + batch_index`` keeps nearby batches, epochs and runs from
    sharing or shifting random streams. The trailing 0 once was the rank (batches were numbered
    per process); it stays so one-process runs keep their seeds.
    """
    state = np.random.SeedSequence([seed, epoch, batch_index, 0]).generate_state(2, dtype=np.uint32)
    return int((int(state[0]) << 31) ^ int(state[1]))


class SeededBatchSampler(Sampler[list[tuple[int, int]]]):
    """This process's batches of the epoch's global order, each index tagged with its batch seed.

    The global order is a permutation of ``range(dataset_len)`` from ``seed + epoch`` (the one
    ``DistributedSampler`` draws). Rank ``r`` of ``W`` takes every ``W``-th chunk of ``batch_size``
    consecutive positions, starting at chunk ``r``. With ``drop_last`` only whole rounds of ``W``
    chunks are used (``dataset_len // (batch_size * W)`` batches per rank); otherwise the order is
    padded cyclically to a multiple of ``W`` and the last, short round is split evenly.

    ``set_epoch(epoch, start_batch)`` must be called before each epoch, as with
    ``DistributedSampler``; ``start_batch`` skips the first batches (mid-epoch resume) while the
    remaining batches keep their indices *and* seeds.

    ``repeats > 1`` is repeated augmentation (see the module docstring): each index of the
    permutation appears ``repeats`` times in a row, the order cut to ``dataset_len``.
    """

    def __init__(
        self,
        dataset_len: int,
        batch_size: int,
        *,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        shuffle: bool = True,
        drop_last: bool = True,
        repeats: int = 1,
    ) -> None:
        if repeats < 1:
            raise ValueError(f"SeededBatchSampler: repeats must be >= 1, got {repeats}")
        if dataset_len < 1:
            raise ValueError(f"SeededBatchSampler: the dataset is empty (dataset_len={dataset_len})")
        if batch_size < 1:
            raise ValueError(f"SeededBatchSampler: batch_size must be >= 1, got {batch_size}")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(
                f"SeededBatchSampler: need 0 <= rank < world_size, got rank={rank}, world_size={world_size}"
            )
        if seed < 0:
            raise ValueError(f"SeededBatchSampler: seed must be >= 0, got {seed}")
        self.dataset_len = dataset_len
        self.batch_size = batch_size
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.shuffle = shuffle
        self.drop_last = drop_last
        self.repeats = repeats
        self.epoch = 0
        self.start_batch = 0
        round_size = batch_size * world_size  # one chunk per rank
        if drop_last:
            self._rounds, self._tail = dataset_len // round_size, 0
        else:  # padded to a multiple of world_size, as DistributedSampler does
            total = math.ceil(dataset_len / world_size) * world_size
            self._rounds, self._tail = divmod(total, round_size)

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        """Select the epoch's permutation; skip its first ``start_batch`` batches (mid-epoch resume)."""
        if epoch < 0:
            raise ValueError(f"SeededBatchSampler.set_epoch: epoch must be >= 0, got {epoch}")
        if not 0 <= start_batch <= len(self):
            raise ValueError(
                f"SeededBatchSampler.set_epoch: start_batch must be in [0, {len(self)}], got {start_batch}"
            )
        self.epoch = epoch
        self.start_batch = start_batch

    def __len__(self) -> int:
        """Batches per epoch on this rank (a full epoch, whatever ``start_batch`` is)."""
        return self._rounds + (1 if self._tail else 0)

    def global_order(self) -> list[int]:
        """The epoch's order of all indices, the same on every rank and for every ``world_size``
        (padded cyclically when ``drop_last`` is off and ``world_size`` does not divide it)."""
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed + self.epoch)
            order = torch.randperm(self.dataset_len, generator=g).tolist()
        else:
            order = list(range(self.dataset_len))
        if self.repeats > 1:  # DeiT's RASampler: repeat_interleave, then keep one epoch's worth
            order = [i for i in order for _ in range(self.repeats)][: self.dataset_len]
        pad = self._rounds * self.batch_size * self.world_size + self._tail - len(order)
        if pad > 0:
            # Repeat from the start (cyclically when the padding exceeds the dataset), so every
            # rank sees the same number of samples and the collectives stay in step.
            order += (order * math.ceil(pad / len(order)))[:pad]
        return order

    def _chunk(self, b: int) -> tuple[int, int, int]:
        """Batch ``b`` of this rank: ``(chunk index, first position, last position + 1)`` in the global order."""
        k = b * self.world_size + self.rank
        if b < self._rounds:
            return k, k * self.batch_size, (k + 1) * self.batch_size
        share = self._tail // self.world_size  # the short last round, split evenly
        lo = self._rounds * self.batch_size * self.world_size + self.rank * share
        return k, lo, lo + share

    def rank_indices(self) -> list[int]:
        """This rank's indices for the current epoch, in order (its batches, concatenated)."""
        order = self.global_order()
        return [i for b in range(len(self)) for i in order[slice(*self._chunk(b)[1:])]]

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        order = self.global_order()
        for b in range(self.start_batch, len(self)):
            k, lo, hi = self._chunk(b)
            s = batch_seed(self.seed, self.epoch, k)
            yield [(i, s) for i in order[lo:hi]]


class SeededDataset(Dataset):
    """Wraps a dataset of tuples; ``__getitem__((idx, seed)) -> (*item, seed)``: ``(image, label,
    seed)`` for a labelled image dataset, ``(image, caption, label, seed)`` for an image–text one."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, key: tuple[int, int]) -> tuple[Any, ...]:
        idx, seed = key
        item = self.dataset[idx]
        if not isinstance(item, (tuple, list)):
            raise TypeError(
                f"SeededDataset: {type(self.dataset).__name__}[{idx}] returned {type(item).__name__}; "
                "datasets must yield tuples such as (image, label) or (image, caption, label)"
            )
        return (*item, seed)
