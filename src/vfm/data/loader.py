"""Building the data loaders: training (seeded batches, :mod:`vfm.data.sampler`, through a
:class:`~vfm.data.collate.Collate`) and evaluation (sequential ``(images, labels)`` batches)."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from vfm.data.collate import Collate
from vfm.data.datasets import LazyImageDataset, TensorImageDataset
from vfm.data.sampler import SeededBatchSampler, SeededDataset

__all__ = ["build_eval_loader", "build_train_loader"]


def _worker_init(worker_id: int) -> None:
    # Each worker would otherwise start as many intra-op threads as there are cores, and
    # N workers x N threads oversubscribes small machines. Randomness needs no seeding here:
    # it comes from the batch seeds.
    torch.set_num_threads(1)


def build_train_loader(
    dataset: Dataset,
    *,
    batch_size: int,
    collate_fn: Callable,
    seed: int = 0,
    rank: int = 0,
    world_size: int = 1,
    num_workers: int = 0,
    pin_memory: bool = False,
    drop_last: bool = True,
    timeout: float = 0.0,
    persistent_workers: bool = True,
    prefetch_factor: int = 2,
    repeats: int | None = None,
) -> tuple[DataLoader, SeededBatchSampler]:
    """A training loader over ``dataset`` with per-batch seeds; returns ``(loader, sampler)``.

    ``batch_size`` is per rank. Call ``sampler.set_epoch(epoch, start_batch)`` before iterating
    each epoch. ``collate_fn`` receives ``[(*item, batch_seed), ...]``: ``(image, label, seed)``
    for an image dataset, ``(image, caption, label, seed)`` for an image–text one. ``timeout``
    (seconds, workers only; 0 = forever) turns a worker stuck on a read into an error.
    ``persistent_workers`` keeps the workers (and their copy of the dataset) alive across epochs;
    ``prefetch_factor`` is the number of batches each worker keeps ready. Both apply only with
    ``num_workers > 0``. ``repeats``: repeated augmentation (each image that many times per
    global batch, :mod:`vfm.data.sampler`); None takes the collate's own ``repeats`` (1 unless the
    method asks for it, e.g. DeiT's 3).

    Image files (folders, image–text CSVs and shards) are read whole for training
    (:meth:`LazyImageDataset.for_training`): random resized crops are drawn from the entire image,
    as torchvision's ``RandomResizedCrop`` does on the decoded file, not from its centre square.
    """
    if repeats is None:
        repeats = collate_fn.repeats if isinstance(collate_fn, Collate) else 1
    if isinstance(dataset, LazyImageDataset):
        dataset = dataset.for_training()
    if prefetch_factor < 1:
        raise ValueError(f"prefetch_factor must be >= 1, got {prefetch_factor}")
    n = len(dataset)  # type: ignore[arg-type]
    if drop_last and n < batch_size * world_size:
        raise ValueError(
            f"the training set has {n} samples, fewer than one global batch "
            f"(batch_size={batch_size} x world_size={world_size} = {batch_size * world_size}); "
            "lower the batch size or use a larger dataset"
        )
    sampler = SeededBatchSampler(
        n, batch_size, seed=seed, rank=rank, world_size=world_size, shuffle=True, drop_last=drop_last, repeats=repeats
    )
    loader = DataLoader(
        SeededDataset(dataset),
        batch_sampler=sampler,
        collate_fn=collate_fn,
        num_workers=num_workers,
        pin_memory=pin_memory,
        worker_init_fn=_worker_init if num_workers > 0 else None,
        persistent_workers=persistent_workers and num_workers > 0,  # no re-fork (and dataset re-copy) per epoch
        prefetch_factor=prefetch_factor if num_workers > 0 else None,
        timeout=timeout if num_workers > 0 else 0,
        # A private generator: the DataLoader draws its base seed from it, not from (and so
        # without advancing) the global torch RNG that methods use.
        generator=torch.Generator().manual_seed(seed),
    )
    return loader, sampler


class _TensorBatches(Dataset):
    """Batch ``i`` of a TensorImageDataset as two slices: no per-item indexing or stacking."""

    def __init__(self, dataset: TensorImageDataset, batch_size: int) -> None:
        self.dataset = dataset
        self.batch_size = batch_size

    def __len__(self) -> int:
        return math.ceil(len(self.dataset) / self.batch_size)

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor]:
        if not 0 <= i < len(self):
            raise IndexError(i)
        sl = slice(i * self.batch_size, (i + 1) * self.batch_size)
        return self.dataset.images[sl], self.dataset.labels[sl]


def _identity(batch: Any) -> Any:
    return batch


def _collate_eval(samples: Sequence[tuple[Tensor, int]]) -> tuple[Tensor, Tensor]:
    return torch.stack([s[0] for s in samples]), torch.tensor([int(s[1]) for s in samples], dtype=torch.int64)


def build_eval_loader(dataset: Dataset, *, batch_size: int, num_workers: int = 0) -> DataLoader:
    """A sequential loader (no shuffle, no drop) yielding ``(uint8 images [B,C,H,W], int64 labels [B])``.

    A :class:`TensorImageDataset` is served by slicing its tensors in the main process
    (``num_workers`` is ignored: slicing is faster than any worker hand-off).
    """
    if batch_size < 1:
        raise ValueError(f"build_eval_loader: batch_size must be >= 1, got {batch_size}")
    if isinstance(dataset, TensorImageDataset):
        # batch_size=None turns off auto-batching: each "item" already is a batch.
        return DataLoader(_TensorBatches(dataset, batch_size), batch_size=None, shuffle=False, collate_fn=_identity)
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=False,
        drop_last=False,
        collate_fn=_collate_eval,
        num_workers=num_workers,
        worker_init_fn=_worker_init if num_workers > 0 else None,
    )
