"""Feature extraction: normalisation, batching, train/eval mode, and the on-disk cache."""

from __future__ import annotations

import os
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch import nn
from torch.utils.data import Dataset

from vfm.evaluators import features as features_mod
from vfm.evaluators.features import (
    SplitFeatures,
    extract_features,
    extract_split_features,
)

MEAN, STD = (0.5, 0.25, 0.1), (0.2, 0.3, 0.4)


class CountingEncoder(nn.Module):
    """flatten + linear; records how often it runs and in which mode."""

    def __init__(self, in_dim: int = 3 * 4 * 4, dim: int = 5) -> None:
        super().__init__()
        with torch.random.fork_rng():  # deterministic weights without touching the global RNG
            torch.manual_seed(0)
            self.proj = nn.Sequential(nn.Flatten(), nn.Linear(in_dim, dim))
        self.calls = 0
        self.modes: list[bool] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        self.modes.append(self.training)
        return self.proj(x)


class TensorDS(Dataset):
    """Mimics TensorImageDataset: whole split as .images / .labels (fast path)."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor) -> None:
        self.images, self.labels = images, labels

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self.images[i], int(self.labels[i])


class ListDS(Dataset):
    """No .images attribute: goes through a DataLoader."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor) -> None:
        self.items = [(img, int(lab)) for img, lab in zip(images, labels, strict=True)]

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self.items[i]


def make_data(n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, 4, 4), generator=g, dtype=torch.uint8), torch.randint(0, 7, (n,), generator=g)


def manual(encoder: CountingEncoder, images: torch.Tensor) -> torch.Tensor:
    x = images.float() / 255.0
    x = (x - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)
    with torch.no_grad():
        return encoder.proj(x)


@pytest.mark.parametrize("ds_cls", [TensorDS, ListDS])
def test_extract_matches_manual_normalisation(ds_cls: type) -> None:
    images, labels = make_data(11)
    enc = CountingEncoder()
    x, y = extract_features(enc, ds_cls(images, labels), mean=MEAN, std=STD, batch_size=4, progress=False)
    assert x.dtype == torch.float32 and y.dtype == torch.int64
    assert x.shape == (11, 5) and x.device.type == "cpu"
    torch.testing.assert_close(x, manual(enc, images), rtol=1e-5, atol=1e-5)
    assert torch.equal(y, labels)
    assert enc.calls == 3  # ceil(11 / 4) batches


def test_mode_restored_and_eval_during_pass() -> None:
    images, labels = make_data(6)
    enc = CountingEncoder()
    enc.train()
    enc.proj[1].eval()  # a submodule deliberately frozen in eval mode must stay so
    extract_features(enc, TensorDS(images, labels), mean=MEAN, std=STD, batch_size=4, progress=False)
    assert enc.modes == [False, False]
    assert enc.training and enc.proj.training and not enc.proj[1].training
    enc.eval()
    extract_features(enc, TensorDS(images, labels), mean=MEAN, std=STD, progress=False)
    assert not enc.training


def test_mode_restored_on_error() -> None:
    class Bad(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x  # not [B, D]

    enc = Bad().train()
    images, labels = make_data(3)
    with pytest.raises(ValueError, match=r"\[B, D\]"):
        extract_features(enc, TensorDS(images, labels), mean=MEAN, std=STD, progress=False)
    assert enc.training


def test_bf16_autocast_returns_float32() -> None:
    images, labels = make_data(5)
    enc = CountingEncoder()
    ds = TensorDS(images, labels)
    x, _ = extract_features(enc, ds, mean=MEAN, std=STD, precision="bf16", batch_size=2, progress=False)
    assert x.dtype == torch.float32
    torch.testing.assert_close(x, manual(enc, images), rtol=0.05, atol=0.1)
    with pytest.raises(ValueError, match="precision"):
        extract_features(enc, TensorDS(images, labels), mean=MEAN, std=STD, precision="fp8", progress=False)


def make_splits(n_train: int = 9, n_val: int = 5) -> SimpleNamespace:
    return SimpleNamespace(
        train=TensorDS(*make_data(n_train, 1)), val=ListDS(*make_data(n_val, 2)), test=None, mean=MEAN, std=STD
    )


def test_split_features_defaults_to_split_stats() -> None:
    splits, enc = make_splits(), CountingEncoder()
    f = extract_split_features(enc, splits, progress=False, batch_size=4)
    assert isinstance(f, SplitFeatures)
    torch.testing.assert_close(f.train_x, manual(enc, splits.train.images), rtol=1e-5, atol=1e-5)
    assert f.val_x is not None and f.val_x.shape == (5, 5)
    assert f.test_x is None and f.test_y is None


def test_cache_hit_miss_and_atomic(tmp_path: os.PathLike) -> None:
    path = tmp_path / "sub" / "feats.pt"
    splits, enc = make_splits(), CountingEncoder()
    first = extract_split_features(enc, splits, cache_path=path, cache_key="ckpt@100", progress=False)
    calls = enc.calls
    assert calls > 0 and path.is_file()
    assert os.listdir(path.parent) == ["feats.pt"]  # no temp file left behind

    # Same key: loaded, encoder not run.
    again = extract_split_features(enc, splits, cache_path=path, cache_key="ckpt@100", progress=False)
    assert enc.calls == calls
    assert torch.equal(again.train_x, first.train_x) and torch.equal(again.val_y, first.val_y)
    assert again.test_x is None

    # Different key: recomputed and overwritten.
    extract_split_features(enc, splits, cache_path=path, cache_key="ckpt@200", progress=False)
    assert enc.calls > calls
    calls = enc.calls
    extract_split_features(enc, splits, cache_path=path, cache_key="ckpt@200", progress=False)
    assert enc.calls == calls

    # Same key but the dataset changed size: stale, recomputed.
    extract_split_features(enc, make_splits(n_train=10), cache_path=path, cache_key="ckpt@200", progress=False)
    assert enc.calls > calls
    assert os.listdir(path.parent) == ["feats.pt"]


def test_corrupt_cache_recomputes(tmp_path: os.PathLike) -> None:
    path = tmp_path / "feats.pt"
    path.write_bytes(b"not a torch file")
    enc = CountingEncoder()
    f = extract_split_features(enc, make_splits(), cache_path=path, cache_key="k", progress=False)
    assert enc.calls > 0 and f.train_x.shape == (9, 5)
    assert torch.load(path, weights_only=True)["key"] == "k"


def test_failed_write_leaves_nothing(tmp_path: os.PathLike, monkeypatch: pytest.MonkeyPatch) -> None:
    def boom(*args: object, **kwargs: object) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(features_mod.torch, "save", boom)
    with pytest.raises(OSError, match="disk full"):
        extract_split_features(CountingEncoder(), make_splits(), cache_path=tmp_path / "f.pt", progress=False)
    assert os.listdir(tmp_path) == []


def test_checkpoint_cache_key_follows_the_file_a_run_directory_loads(tmp_path: os.PathLike) -> None:
    """Training a run further rewrites checkpoints/last.pt (the run directory's own mtime does not
    change): the features cached for the old weights must not be reused."""
    from vfm.evaluate import checkpoint_cache_key

    run = Path(tmp_path) / "run"
    (run / "checkpoints").mkdir(parents=True)
    last = run / "checkpoints" / "last.pt"
    last.write_bytes(b"step 100")
    os.utime(last, ns=(1_000_000_000, 1_000_000_000))
    before = checkpoint_cache_key(run)
    last.write_bytes(b"step 200")
    os.utime(last, ns=(2_000_000_000, 2_000_000_000))
    assert checkpoint_cache_key(run) != before
    assert checkpoint_cache_key(run) == checkpoint_cache_key(last)  # the directory and its file: one key
    export = run / "encoder.safetensors"  # an export wins over last.pt, as when loading
    export.write_bytes(b"weights")
    assert checkpoint_cache_key(run) == checkpoint_cache_key(export)
