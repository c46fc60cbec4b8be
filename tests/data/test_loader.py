"""Seeded sampling and loading: sharding, per-batch seeds, resume, workers, collate, eval loader."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.utils.data import Dataset, DistributedSampler

from vfm.data.collate import MultiCropCollate
from vfm.data.datasets import TensorImageDataset, synthetic
from vfm.data.loader import build_eval_loader, build_train_loader
from vfm.data.sampler import SeededBatchSampler, SeededDataset
from vfm.data.transforms import MultiCropAugmentation


def epoch(sampler: SeededBatchSampler, e: int, start_batch: int = 0) -> list[list[tuple[int, int]]]:
    sampler.set_epoch(e, start_batch)
    return list(sampler)


@pytest.mark.parametrize("drop_last", [False, True])
def test_ranks_disjoint_and_covering(drop_last: bool) -> None:
    n, world, bs = 103, 4, 5
    per_rank = []
    for rank in range(world):
        sampler = SeededBatchSampler(n, bs, seed=1, rank=rank, world_size=world, drop_last=drop_last)
        batches = epoch(sampler, 2)
        assert len(batches) == len(sampler) == (5 if drop_last else 6)
        assert all(len(b) == bs for b in batches[:5])
        per_rank.append([i for b in batches for i, _ in b])
        assert sampler.rank_indices() == per_rank[-1]
        # One global order, DistributedSampler's permutation; rank r's b-th batch is its chunk b * world + r.
        ds = DistributedSampler(range(n), num_replicas=1, rank=0, shuffle=True, seed=1)
        ds.set_epoch(2)
        order = sampler.global_order()
        assert order[:n] == list(ds)
        for b, batch in enumerate(batches[:5]):
            k = b * world + rank
            assert [i for i, _ in batch] == order[k * bs : (k + 1) * bs]
    if not drop_last:
        # 103 padded to 104: every index is seen, exactly one is seen twice, ranks get equal shares.
        assert all(len(r) == 26 for r in per_rank)
        flat = [i for r in per_rank for i in r]
        assert set(flat) == set(range(n)) and len(flat) == 104
        # The shards themselves are disjoint up to the padding sample.
        assert sum(len(set(a) & set(b)) for k, a in enumerate(per_rank) for b in per_rank[k + 1 :]) <= 1
    else:
        for k, a in enumerate(per_rank):
            for b in per_rank[k + 1 :]:
                assert not set(a) & set(b)


def test_per_batch_seeds_stable_and_distinct() -> None:
    a = SeededBatchSampler(64, 8, seed=3)
    b = SeededBatchSampler(64, 8, seed=3)
    e0 = epoch(a, 0)
    assert e0 == epoch(b, 0) == epoch(a, 0)  # stable across instances and re-iteration
    for batch in e0:
        assert len({s for _, s in batch}) == 1  # one seed per batch
    seeds = [batch[0][1] for batch in e0]
    assert len(set(seeds)) == len(seeds)
    e1 = epoch(a, 1)
    assert {b[0][1] for b in e1}.isdisjoint(seeds)
    assert [i for b in e1 for i, _ in b] != [i for b in e0 for i, _ in b]  # new permutation
    # A batch's indices and seed depend on its place in the global order, not on the process
    # count: rank 1 of 2 gets the one-process run's batches 1, 3, 5, 7, seeds included.
    other_rank = SeededBatchSampler(64, 8, seed=3, rank=1, world_size=2)
    assert epoch(other_rank, 0) == e0[1::2]
    other_seed = SeededBatchSampler(64, 8, seed=4)
    assert {b[0][1] for b in epoch(other_seed, 0)}.isdisjoint(seeds)
    assert all(0 <= s < 2**63 for s in seeds)


@pytest.mark.parametrize(("world", "accum"), [(1, 1), (2, 1), (1, 4), (2, 2), (4, 1)])
def test_global_batches_do_not_depend_on_the_process_count(world: int, accum: int) -> None:
    """Step s trains on positions [s G, (s + 1) G) of one global order, whatever G's split; with the
    same per-process batch, on the same batches (indices and seeds) too; and resuming at step s on
    any layout continues there."""
    n, global_batch, epoch_ = 100, 16, 3
    micro = global_batch // (world * accum)
    ranks = [SeededBatchSampler(n, micro, seed=7, rank=r, world_size=world) for r in range(world)]
    per_rank = [epoch(s, epoch_) for s in ranks]
    steps = n // global_batch
    assert all(len(s) // accum == steps for s in ranks)
    order = ranks[0].global_order()
    one = epoch(SeededBatchSampler(n, micro, seed=7), epoch_)  # one process, world * accum micro-steps
    for step in range(steps):
        batches = [b for r in range(world) for b in per_rank[r][step * accum : (step + 1) * accum]]
        assert sorted(i for b in batches for i, _ in b) == sorted(order[step * global_batch : (step + 1) * global_batch])
        assert sorted(batches) == sorted(one[step * world * accum : (step + 1) * world * accum])
    resumed = [epoch(s, epoch_, start_batch=2 * accum) for s in ranks]
    assert all(resumed[r] == per_rank[r][2 * accum :] for r in range(world))
    if (world, accum) == (1, 1):  # one process: the batches (and seeds) of every earlier version
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(7 + epoch_)).tolist()
        for k, batch in enumerate(one):
            hi, lo = np.random.SeedSequence([7, epoch_, k, 0]).generate_state(2, dtype=np.uint32)
            assert batch == [(i, (int(hi) << 31) ^ int(lo)) for i in perm[k * 16 : (k + 1) * 16]]


def test_start_batch_yields_tail_of_epoch() -> None:
    sampler = SeededBatchSampler(50, 6, seed=0)
    full = epoch(sampler, 5)
    assert len(full) == len(sampler) == 8
    for start in (0, 3, 8):
        assert epoch(sampler, 5, start) == full[start:]
        assert len(sampler) == 8  # __len__ is the full epoch
    with pytest.raises(ValueError, match="start_batch"):
        sampler.set_epoch(5, 9)


def test_no_shuffle_is_sequential() -> None:
    sampler = SeededBatchSampler(10, 4, shuffle=False, drop_last=False)
    assert [[i for i, _ in b] for b in epoch(sampler, 3)] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]


def test_seeded_dataset_and_collate() -> None:
    data = synthetic(num_train=8, num_val=0, num_test=0, img_size=16)
    seeded = SeededDataset(data.train)
    image, label, seed = seeded[(3, 1234)]
    assert torch.equal(image, data.train.images[3]) and label == int(data.train.labels[3]) and seed == 1234
    aug = MultiCropAugmentation(global_crop_size=16, local_crop_size=8, n_local=3, mean=data.mean, std=data.std)
    collate = MultiCropCollate(aug)
    samples = [seeded[(i, 99)] for i in range(4)]
    out = collate(samples)
    assert set(out) == {"crops", "label"}
    assert len(out["crops"]) == 5
    assert [tuple(c.shape) for c in out["crops"]] == [(4, 1, 16, 16)] * 2 + [(4, 1, 8, 8)] * 3
    assert out["label"].dtype == torch.int64 and out["label"].tolist() == data.train.labels[:4].tolist()
    # The crops are a function of the batch seed alone.
    expected = aug(data.train.images[:4], torch.Generator().manual_seed(99))
    assert all(torch.equal(a, b) for a, b in zip(out["crops"], expected, strict=True))
    with pytest.raises(ValueError, match="different seeds"):
        collate([seeded[(0, 1)], seeded[(1, 2)]])
    with pytest.raises(ValueError, match="SeededDataset"):
        collate([data.train[0], data.train[1]])


def _batches(loader, sampler, epochs=(0, 1), start_batch=0):
    out = []
    for e in epochs:
        sampler.set_epoch(e, start_batch if e == epochs[0] else 0)
        out.extend(loader)
    return out


def test_train_loader_identical_with_and_without_workers() -> None:
    data = synthetic(num_train=48, num_val=0, num_test=0, img_size=12)
    aug = MultiCropAugmentation(global_crop_size=12, local_crop_size=6, n_local=2, mean=data.mean, std=data.std)
    runs = []
    for workers in (0, 1):
        loader, sampler = build_train_loader(
            data.train, batch_size=16, collate_fn=MultiCropCollate(aug), seed=5, num_workers=workers
        )
        assert len(loader) == len(sampler) == 3
        runs.append((_batches(loader, sampler), _batches(loader, sampler, epochs=(1,), start_batch=1)))
    (full0, resumed0), (full1, resumed1) = runs
    for a, b in zip(full0 + resumed0, full1 + resumed1, strict=True):
        assert torch.equal(a["label"], b["label"])
        assert all(torch.equal(x, y) for x, y in zip(a["crops"], b["crops"], strict=True))
    # Resuming epoch 1 at batch 1 replays exactly the uninterrupted run's batches 1 and 2.
    assert len(resumed0) == 2
    for a, b in zip(resumed0, full0[4:], strict=True):
        assert torch.equal(a["label"], b["label"]) and torch.equal(a["crops"][0], b["crops"][0])
    # The loader does not consume the global RNG (methods rely on it).
    state = torch.get_rng_state()
    _batches(*build_train_loader(data.train, batch_size=16, collate_fn=MultiCropCollate(aug)))
    assert torch.equal(state, torch.get_rng_state())


def test_train_loader_rejects_tiny_dataset() -> None:
    data = synthetic(num_train=10, num_val=0, num_test=0)
    with pytest.raises(ValueError, match="fewer than one global batch"):
        build_train_loader(data.train, batch_size=8, world_size=2, collate_fn=lambda s: s)


class _ListDataset(Dataset):
    def __init__(self, ds: TensorImageDataset) -> None:
        self.ds = ds

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, i: int):
        return self.ds[i]


@pytest.mark.parametrize("wrap", [False, True], ids=["tensor_fast_path", "generic"])
def test_eval_loader_sequential_no_drop(wrap: bool) -> None:
    ds = synthetic(num_train=23, num_val=0, num_test=0, img_size=8).train
    loader = build_eval_loader(_ListDataset(ds) if wrap else ds, batch_size=10)
    batches = list(loader)
    assert len(loader) == len(batches) == 3
    images = torch.cat([b[0] for b in batches])
    labels = torch.cat([b[1] for b in batches])
    assert [len(b[1]) for b in batches] == [10, 10, 3]
    assert images.dtype == torch.uint8 and labels.dtype == torch.int64
    assert torch.equal(images, ds.images) and torch.equal(labels, ds.labels)
