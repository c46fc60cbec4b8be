"""Data loaders whose augmentation randomness belongs to the batch, not to the worker.

Exact resume and run-to-run reproducibility need every random augmentation parameter to be a
function of *which batch this is*, not of which worker process built it or how many batches that
worker built before. So:

* :class:`SeededBatchSampler` shards and batches indices like ``DistributedSampler`` and tags
  every index of a batch with one seed derived from ``(seed, epoch, batch_index, rank)``;
* :class:`SeededDataset` passes that seed through next to ``(image, label)``;
* the collate function (e.g. :class:`MultiCropCollate`) stacks the uint8 images and runs the
  batched augmentation with ``torch.Generator().manual_seed(batch_seed)``.

The result: the same batch gets the same crops with ``num_workers`` 0 or 8, and resuming at
``(epoch, start_batch)`` replays exactly the batches an uninterrupted run would have seen.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Sampler

from vfm.data.datasets import TensorImageDataset
from vfm.data.transforms import MultiCropAugmentation

__all__ = [
    "MultiCropCollate",
    "SeededBatchSampler",
    "SeededDataset",
    "batch_seed",
    "build_eval_loader",
    "build_train_loader",
]


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
    """Wraps a dataset of ``(image, label)``; ``__getitem__((idx, seed)) -> (image, label, seed)``."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, key: tuple[int, int]) -> tuple[Tensor, int, int]:
        idx, seed = key
        image, label = self.dataset[idx]
        return image, label, seed


def _stack_samples(samples: Sequence[tuple[Any, ...]], who: str) -> tuple[Tensor, Tensor, int]:
    """uint8 images ``[B,C,H,W]``, int64 labels ``[B]`` and the batch seed of seeded samples."""
    if not samples or len(samples[0]) != 3:
        raise ValueError(
            f"{who} expects (image, label, seed) samples from SeededDataset + SeededBatchSampler "
            "(use vfm.data.loader.build_train_loader)"
        )
    seed = samples[0][2]
    if any(s[2] != seed for s in samples):
        raise ValueError(
            f"{who}: the samples of one batch carry different seeds; batches must come from SeededBatchSampler"
        )
    images = torch.stack([s[0] for s in samples])
    labels = torch.tensor([int(s[1]) for s in samples], dtype=torch.int64)
    return images, labels, int(seed)


class MultiCropCollate:
    """Collate for multi-crop methods (DINO, iBOT, DINOv2): stack the uint8 images and augment the
    batch with a generator seeded by the batch seed.

    Returns ``{"crops": list of float [B, C, s, s] (globals first), "label": int64 [B]}``, plus
    ``"masks"``: one bool ``[B, N]`` patch mask per global crop when ``masking`` is given (masked
    image modelling, iBOT / DINOv2). ``masking(batch_size=, grid_size=, generator=)`` draws them
    (e.g. a partial of :func:`vfm.data.masking.sample_masks`); the grid is the global crop size
    divided by ``patch_size``. Masks are drawn after the crops from the same per-batch generator,
    so they are reproducible like the augmentation.
    """

    def __init__(self, augment: MultiCropAugmentation, masking: Callable | None = None,
                 patch_size: int | None = None) -> None:
        if masking is not None and not patch_size:
            raise ValueError("MultiCropCollate: masking needs the backbone's patch_size")
        self.augment, self.masking, self.patch_size = augment, masking, patch_size

    def __call__(self, samples: Sequence[tuple[Tensor, int, int]]) -> dict[str, Any]:
        images, labels, seed = _stack_samples(samples, "MultiCropCollate")
        generator = torch.Generator().manual_seed(seed)
        out: dict[str, Any] = {"crops": self.augment(images, generator), "label": labels}
        if self.masking is not None:
            grid = self.augment.global_crop_size // self.patch_size
            out["masks"] = [
                self.masking(batch_size=len(labels), grid_size=grid, generator=generator)
                for _ in range(self.augment.n_global)
            ]
        return out


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
) -> tuple[DataLoader, SeededBatchSampler]:
    """A training loader over ``dataset`` with per-batch seeds; returns ``(loader, sampler)``.

    ``batch_size`` is per rank. Call ``sampler.set_epoch(epoch, start_batch)`` before iterating
    each epoch. ``collate_fn`` receives ``[(image, label, batch_seed), ...]``.
    """
    n = len(dataset)  # type: ignore[arg-type]
    if drop_last and n < batch_size * world_size:
        raise ValueError(
            f"the training set has {n} samples, fewer than one global batch "
            f"(batch_size={batch_size} x world_size={world_size} = {batch_size * world_size}); "
            "lower the batch size or use a larger dataset"
        )
    sampler = SeededBatchSampler(
        n, batch_size, seed=seed, rank=rank, world_size=world_size, shuffle=True, drop_last=drop_last
    )
    loader = DataLoader(
        SeededDataset(dataset),
        batch_sampler=sampler,
        collate_fn=collate_fn,
        num_workers=num_workers,
        pin_memory=pin_memory,
        worker_init_fn=_worker_init if num_workers > 0 else None,
        persistent_workers=num_workers > 0,  # no re-fork (and re-copy of the dataset) every epoch
        prefetch_factor=2 if num_workers > 0 else None,
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
