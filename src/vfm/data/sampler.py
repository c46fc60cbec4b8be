"""The seeded, resumable batch sampler: augmentation randomness belongs to the batch, not to the worker.

Exact resume and run-to-run reproducibility need every random augmentation parameter to be a
function of *which batch this is*, not of which worker process built it or how many batches that
worker built before. So:

* :class:`SeededBatchSampler` shards and batches indices like ``DistributedSampler`` and tags
  every index of a batch with one seed derived from ``(seed, epoch, batch_index, rank)``;
* :class:`SeededDataset` passes that seed through next to ``(image, label)`` (or any item tuple,
  e.g. ``(image, caption, label)`` of :mod:`vfm.data.image_text`);
* the collate (:mod:`vfm.data.collate`) stacks the uint8 images and runs the batched augmentation
  with ``torch.Generator().manual_seed(batch_seed)``.

The result: the same batch gets the same crops with ``num_workers`` 0 or 8, and resuming at
``(epoch, start_batch)`` replays exactly the batches an uninterrupted run would have seen.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

__all__ = ["SeededBatchSampler", "SeededDataset", "batch_seed"]


def batch_seed(seed: int, epoch: int, batch_index: int, rank: int) -> int:
    """A 63-bit seed for one batch, well mixed from its coordinates (numpy ``SeedSequence``).

    Hashing rather than e.g. ``seed + batch_index`` keeps nearby batches, epochs, ranks and runs
    from sharing or shifting random streams.
    """
    state = np.random.SeedSequence([seed, epoch, batch_index, rank]).generate_state(2, dtype=np.uint32)
    return int((int(state[0]) << 31) ^ int(state[1]))


class SeededBatchSampler(Sampler[list[tuple[int, int]]]):
    """Shards like ``torch.utils.data.DistributedSampler`` (same permutation from
    ``seed + epoch`` on every rank, padded to a multiple of ``world_size`` by repeating the
    start, then ``rank::world_size``), batches, and tags every index with a per-batch seed
    derived from ``(seed, epoch, batch_index, rank)`` so augmentation is reproducible and
    independent of ``num_workers``.

    ``set_epoch(epoch, start_batch)`` must be called before each epoch, as with
    ``DistributedSampler``; ``start_batch`` skips the first batches (mid-epoch resume) while the
    remaining batches keep their indices *and* seeds.
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
    ) -> None:
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
        self.num_samples = math.ceil(dataset_len / world_size)  # per rank, after padding
        self.epoch = 0
        self.start_batch = 0

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
        if self.drop_last:
            return self.num_samples // self.batch_size
        return math.ceil(self.num_samples / self.batch_size)

    def rank_indices(self) -> list[int]:
        """This rank's indices for the current epoch, in order (before batching)."""
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed + self.epoch)
            indices = torch.randperm(self.dataset_len, generator=g).tolist()
        else:
            indices = list(range(self.dataset_len))
        total = self.num_samples * self.world_size
        pad = total - len(indices)
        if pad > 0:
            # Repeat from the start (cyclically when the padding exceeds the dataset), so every
            # rank sees the same number of samples and the collectives stay in step.
            indices += (indices * math.ceil(pad / len(indices)))[:pad]
        return indices[self.rank : total : self.world_size]

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        indices = self.rank_indices()
        for b in range(self.start_batch, len(self)):
            chunk = indices[b * self.batch_size : (b + 1) * self.batch_size]
            s = batch_seed(self.seed, self.epoch, b, self.rank)
            yield [(i, s) for i in chunk]


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
