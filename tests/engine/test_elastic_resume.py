"""Elastic resume: a run stopped on N processes continues on M with the same global batch, at the
same sample, and ends where the uninterrupted run ends up to floating-point reduction order.

The slow tests kill real `pretrain` runs with SIGKILL (tests/inject_faults.py) and record which
dataset indices, with which augmentation seed, every optimisation step trained on. The per-process
batch stays 8 images (2 processes x 1 micro-step or 1 process x 2), so every sample also gets the
same crops (docs/reliability.md, "Resuming on another number of processes"). DINO's center is
frozen (`method.center_momentum=1`): it is updated after every micro-step, so with
`trainer.accum_steps` 2 instead of 1 it would follow another (equally valid) trajectory, a
property of the method under accumulation rather than of resuming. Drop path is off: its random
draws are per process.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import pytest
import torch

from conftest import TINY, Regression, regression_collate
from vfm.data.datasets import TensorImageDataset
from vfm.engine.optim import OptimSpec
from vfm.engine.trainer import Trainer

# ------------------------------------------------------------------ the checks of the checkpoint


def _fit(run_dir: Path, n: int = 64, batch_size: int = 8, max_epochs: int = 1) -> dict:
    g = torch.Generator().manual_seed(0)
    data = TensorImageDataset(torch.randint(0, 256, (n, 1, 4, 4), dtype=torch.uint8, generator=g),
                              torch.randint(0, 2, (n,), generator=g))
    trainer = Trainer(max_epochs=max_epochs, batch_size=batch_size, precision="fp32", device="cpu", progress=False)
    return trainer.fit(Regression(), data, regression_collate, optim=OptimSpec(blr=0.1, warmup_epochs=0), schedules={},
                       run_dir=run_dir)


def test_checkpoint_records_the_layout_and_refuses_another_global_batch_or_dataset(tmp_path):
    _fit(tmp_path)
    state = torch.load(tmp_path / "checkpoints/last.pt", weights_only=False)
    assert (state["world_size"], state["global_batch"], state["micro_batch"], state["train_samples"]) == (1, 8, 8, 64)
    with pytest.raises(ValueError, match=r"global batch of 8 images, this run has 16; keep trainer.batch_size"):
        _fit(tmp_path, batch_size=16, max_epochs=2)
    with pytest.raises(ValueError, match=r"trained on 64 images, this run's training set has 72"):
        _fit(tmp_path, n=72, max_epochs=2)


def _strip_layout_keys(path: Path) -> None:
    """`path` as checkpoints were written before the layout keys existed."""
    state = torch.load(path, weights_only=False)
    for key in ("world_size", "global_batch", "micro_batch", "train_samples"):
        del state[key]
    torch.save(state, path)


def test_checkpoint_without_the_layout_keys_resumes_as_before(tmp_path):
    _fit(tmp_path)
    _strip_layout_keys(tmp_path / "checkpoints/last.pt")
    assert _fit(tmp_path, max_epochs=2)["step"] == 16
    _strip_layout_keys(tmp_path / "checkpoints/last.pt")
    with pytest.raises(ValueError, match="8 steps per epoch, this run has 4"):  # still checked
        _fit(tmp_path, batch_size=16, max_epochs=3)


# ------------------------------------------------------------------ kill, resume on another process count
# 128 images, global batch 16: 8 steps per epoch, 2 epochs; last.pt every 3 steps and at epoch ends
ARGS = [o for o in TINY if not o.startswith("trainer.batch_size")] + [
    "dataset.num_train=128", "trainer.batch_size=16", "trainer.precision=fp32", "backbone.drop_path_rate=0",
    "method.center_momentum=1.0", "trainer.ckpt_every_n_steps=3", "evaluator=[]", "eval.baseline=false",
]
LAYOUT = {1: ["trainer.accum_steps=2"], 2: ["trainer.accum_steps=1"]}  # 8 images per process and micro-step
INJECT = str(Path(__file__).parents[1] / "inject_faults.py")


def _pretrain(run: Path, nproc: int, record: Path, fault: str = "") -> subprocess.CompletedProcess:
    """`pretrain` on `nproc` processes (torchrun, gloo), recording its batches into `record`."""
    launcher = [sys.executable] if nproc == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    cmd = [*launcher, INJECT, *ARGS, *LAYOUT[nproc], f"hydra.run.dir={run}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "VFM_FAULT": fault, "VFM_RECORD_BATCHES": str(record)}
    record.mkdir(exist_ok=True)
    return subprocess.run(cmd, capture_output=True, text=True, timeout=180, env=env)


def _steps(record: Path) -> dict[int, set[tuple[int, tuple[int, ...]]]]:
    """step -> the (seed, indices) of the micro-batches it trained on, over every process and run."""
    out: dict[int, set] = defaultdict(set)
    for f in record.glob("*.txt"):
        for line in f.read_text().splitlines():
            step, _rank, seed, *idx = map(int, line.split())
            out[step].add((seed, tuple(idx)))
    return dict(out)


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> tuple[dict, dict]:
    root = tmp_path_factory.mktemp("elastic")
    proc = _pretrain(root / "run", 1, root / "record")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return torch.load(root / "run/checkpoints/last.pt", weights_only=False), _steps(root / "record")


@pytest.mark.slow
@pytest.mark.parametrize(("first", "then", "kill_at", "resumed_at"), [(2, 1, 11, 9), (1, 2, 5, 3)])
def test_killed_run_resumes_on_another_process_count(reference, tmp_path, first, then, kill_at, resumed_at):
    ref_state, ref_steps = reference
    run, record = tmp_path / "run", tmp_path / "record"
    proc = _pretrain(run, first, record, fault=f"kill_at_step={kill_at}")
    assert proc.returncode != 0 and (first == 2 or proc.returncode == -signal.SIGKILL), proc.stderr[-2000:]
    assert torch.load(run / "checkpoints/last.pt", weights_only=False)["step"] == resumed_at  # mid-epoch
    again = _pretrain(run, then, record)
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"resuming a run of {first} process(es) on {then}" in (run / "pretrain.log").read_text()

    # the same samples, in the same order, with the same augmentation seeds, at every step
    assert sorted(ref_steps) == list(range(16))
    for epoch in range(2):  # each epoch sees every sample once
        seen = [i for s in range(8 * epoch, 8 * epoch + 8) for _, idx in ref_steps[s] for i in idx]
        assert sorted(seen) == list(range(128))
    assert _steps(record) == ref_steps

    # The final weights and optimizer moments are bitwise equal here (measured: 0 difference):
    # each step sums the gradients of two micro-batches of the same shapes, as g1/2 + g2/2 (1
    # process, 2 micro-steps) or through DDP's all-reduce (2 processes), and a sum of two terms has
    # one order. With more terms per step the order differs: equal within float tolerance
    # (docs/reliability.md).
    state = torch.load(run / "checkpoints/last.pt", weights_only=False)
    assert state["step"] == 16 and state["world_size"] == then
    diffs = {k: (state["model"][k].double() - v.double()).abs().max().item() for k, v in ref_state["model"].items()}
    worst = max(diffs, key=diffs.get)
    assert diffs[worst] == 0.0, f"{worst}: {diffs[worst]:.3g}"
    moments = [(a[m], ref_state["optimizer"]["state"][i][m]) for i, a in state["optimizer"]["state"].items()
               for m in ("exp_avg", "exp_avg_sq")]
    assert all(torch.equal(a, b) for a, b in moments)
