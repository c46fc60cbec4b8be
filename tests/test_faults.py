"""Fault tests: each failure a long run meets in practice, injected for real (SIGKILL, torn files,
NaNs on one rank, dead or hung processes and workers, signals), and what the user is promised:
the run resumes exactly, never reads a damaged file, and fails fast with a message instead of
hanging. The faults are injected by tests/inject_faults.py; the README's "Reliability" section
lists each guarantee with its test.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import TINY

pytestmark = pytest.mark.slow

INJECT = str(Path(__file__).with_name("inject_faults.py"))
# 16 steps (2 epochs of 8), last.pt every 3 steps, every step logged, fp32, drop path on (so the
# global RNG must be restored exactly)
COMMON = [*TINY, "trainer.precision=fp32", "backbone.drop_path_rate=0.2", "trainer.ckpt_every_n_steps=3",
          "trainer.log_every_n_steps=1", "evaluator=[]", "eval.baseline=false", "logger=tensorboard"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def pretrain(run: Path, *extra: str, fault: str = "", nproc: int = 1, timeout: float = 240) -> subprocess.CompletedProcess:
    launcher = [sys.executable] if nproc == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    cmd = [*launcher, INJECT, *COMMON, *extra, f"hydra.run.dir={run}"]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env={**ENV, "VFM_FAULT": fault})


def final_state(run: Path) -> dict:
    return torch.load(run / "checkpoints/last.pt", weights_only=False)


def assert_same_training_state(a: dict, b: dict) -> None:
    assert a["step"] == b["step"]
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    sa, sb = a["optimizer"]["state"], b["optimizer"]["state"]
    assert all(torch.equal(sa[i]["exp_avg"], sb[i]["exp_avg"]) and torch.equal(sa[i]["exp_avg_sq"], sb[i]["exp_avg_sq"])
               for i in sa)


def tb_steps(run: Path, tag: str = "train/loss") -> list[int]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run / "tb"), size_guidance={"scalars": 0})
    acc.Reload()
    return [e.step for e in acc.Scalars(tag)]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> dict[int, Path]:
    """The reference runs, without faults: {process count: run dir}, made on first use."""
    root, runs = tmp_path_factory.mktemp("reference"), {}

    class Runs(dict):
        def __missing__(self, nproc: int) -> Path:
            run = root / f"np{nproc}"
            proc = pretrain(run, nproc=nproc)
            assert proc.returncode == 0, proc.stderr[-3000:]
            self[nproc] = run
            return run

    return Runs(runs)


# ------------------------------------------------------------------ kill -9 and auto-resume
def test_kill9_at_a_random_step_then_rerun_equals_uninterrupted(uninterrupted, tmp_path):
    k = random.Random().randint(1, 15)  # any step must work; the message names the one drawn
    run = tmp_path / "run"
    proc = pretrain(run, fault=f"kill_at_step={k}")
    assert proc.returncode == -signal.SIGKILL, f"step {k}: {proc.stderr[-2000:]}"
    again = pretrain(run)
    assert again.returncode == 0, f"step {k}: {again.stderr[-3000:]}"
    assert_same_training_state(final_state(run), final_state(uninterrupted[1]))
    # the steps the killed run logged after its last checkpoint are purged: one value per step
    assert tb_steps(run) == list(range(1, 17)), f"killed at step {k}"


def test_kill9_during_a_checkpoint_write_then_rerun_equals_uninterrupted(uninterrupted, tmp_path):
    run = tmp_path / "run"
    # writes: steps 3, 6, then 8 (end of epoch 1): killed halfway through that one, it leaves a torn temporary
    proc = pretrain(run, fault="kill_in_checkpoint=3")
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    assert [p.name for p in (run / "checkpoints").iterdir() if p.name.startswith(".last.pt.tmp-")]
    assert final_state(run)["step"] == 6  # the last good checkpoint was never replaced
    again = pretrain(run)
    assert again.returncode == 0, again.stderr[-3000:]
    log = (run / "pretrain.log").read_text()
    assert "at step 6 (epoch 0)" in log and "left by a process killed while writing it" in log
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["last.pt"]
    assert_same_training_state(final_state(run), final_state(uninterrupted[1]))
    assert tb_steps(run) == list(range(1, 17))


def test_kill9_of_one_rank_then_rerun_equals_uninterrupted_two_process(uninterrupted, tmp_path):
    run = tmp_path / "run"
    t0 = time.monotonic()
    proc = pretrain(run, nproc=2, fault="kill_at_step=11,rank=1")
    assert proc.returncode != 0
    assert time.monotonic() - t0 < 120  # torchrun stops the surviving rank instead of waiting forever
    assert final_state(run)["step"] == 9
    again = pretrain(run, nproc=2)
    assert again.returncode == 0, again.stderr[-3000:]
    assert_same_training_state(final_state(run), final_state(uninterrupted[2]))
    assert tb_steps(run) == list(range(1, 17))


# ------------------------------------------------------------------ graceful stop on a signal
@pytest.mark.parametrize("sig", ["USR1", "TERM"])
def test_signal_checkpoints_at_the_step_boundary_and_rerun_resumes(sig, uninterrupted, tmp_path):
    run = tmp_path / "run"
    # a fake `scontrol` records whether the job asked to be requeued (SLURM's time-limit warning)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "scontrol").write_text(f"#!/bin/sh\necho \"$@\" > {tmp_path}/requeued\n")
    (bin_dir / "scontrol").chmod(0o755)
    env = {**ENV, "VFM_FAULT": f"signal_at_step=5,sig={sig}", "SLURM_JOB_ID": "4242",
           "PATH": f"{bin_dir}:{os.environ['PATH']}"}
    cmd = [sys.executable, INJECT, *COMMON, f"hydra.run.dir={run}"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=env)
    signum = getattr(signal, "SIG" + sig)
    assert proc.returncode == 128 + signum, proc.stderr[-2000:]
    assert f"stopped by SIG{sig} after step 5" in proc.stderr and "Re-run the same command" in proc.stderr
    assert final_state(run)["step"] == 5
    if sig == "USR1":
        assert (tmp_path / "requeued").read_text().split() == ["requeue", "4242"]
    else:  # SIGTERM (preemption, scancel): SLURM decides about requeueing, not us
        assert not (tmp_path / "requeued").exists()
    again = pretrain(run)
    assert again.returncode == 0, again.stderr[-3000:]
    assert_same_training_state(final_state(run), final_state(uninterrupted[1]))


def test_signal_on_one_rank_stops_both_after_the_same_step(uninterrupted, tmp_path):
    run = tmp_path / "run"
    proc = pretrain(run, nproc=2, fault="signal_at_step=4,sig=USR1,rank=0")
    assert proc.returncode != 0
    assert "stopped by SIGUSR1 after step 4" in proc.stderr
    assert final_state(run)["step"] == 4
    again = pretrain(run, nproc=2)
    assert again.returncode == 0, again.stderr[-3000:]
    assert_same_training_state(final_state(run), final_state(uninterrupted[2]))


# ------------------------------------------------------------------ non-finite loss on one rank
def test_nan_on_one_rank_stops_all_ranks_at_that_step_and_writes_nothing_after(tmp_path):
    run = tmp_path / "run"
    t0 = time.monotonic()
    # rank 1's 8th micro-batch (step index 7) is NaN; last.pt is written every step here
    proc = pretrain(run, "trainer.ckpt_every_n_steps=1", nproc=2, fault="nan_at_micro=7,rank=1")
    elapsed = time.monotonic() - t0
    assert proc.returncode != 0
    assert "non-finite loss (nan) at step 7 (epoch 1) on at least one process" in proc.stderr
    assert proc.stderr.count("error: non-finite loss") == 2  # both ranks say it, neither hangs
    assert elapsed < 90
    assert final_state(run)["step"] == 7  # the state before the bad step, nothing after it
    assert max(tb_steps(run)) == 7


# ------------------------------------------------------------------ dead or missing processes
def test_dataloader_worker_killed_fails_fast_with_a_message(tmp_path):
    t0 = time.monotonic()
    proc = pretrain(tmp_path / "run", "trainer.num_workers=2", fault="kill_worker_at=70")
    assert proc.returncode not in (0, None)
    assert "DataLoader worker" in proc.stderr and "killed by signal" in proc.stderr
    assert time.monotonic() - t0 < 60


def test_dataloader_worker_hung_fails_after_data_timeout(tmp_path):
    t0 = time.monotonic()
    proc = pretrain(tmp_path / "run", "trainer.num_workers=1", "trainer.data_timeout_s=5", fault="hang_worker_at=70")
    assert proc.returncode not in (0, None)
    assert "timed out after 5 seconds" in proc.stderr
    assert time.monotonic() - t0 < 60


def test_rank_that_never_joins_fails_the_job_after_dist_timeout(tmp_path):
    t0 = time.monotonic()
    proc = pretrain(tmp_path / "run", "trainer.dist_timeout_s=10", nproc=2, fault="hang_before_init,rank=1")
    assert proc.returncode != 0
    assert time.monotonic() - t0 < 90, proc.stderr[-2000:]


def test_rank_that_stops_answering_mid_run_fails_the_job_after_dist_timeout(tmp_path):
    t0 = time.monotonic()
    proc = pretrain(tmp_path / "run", "trainer.dist_timeout_s=10", nproc=2, fault="hang_at_step=3,rank=1")
    assert proc.returncode != 0
    assert time.monotonic() - t0 < 90, proc.stderr[-2000:]
    assert final_state(tmp_path / "run")["step"] == 3  # checkpointed before the hang; nothing after


# ------------------------------------------------------------------ sweeps
def sweep(sweep_dir: Path, *overrides: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "vfm.pretrain", "-m", *TINY, "trainer.max_epochs=1", "evaluator=[knn]",
           "eval.baseline=false", "logger=tensorboard", *overrides, f"hydra.sweep.dir={sweep_dir}"]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=ENV)


def test_sweep_rejects_an_invalid_combination_before_any_job_starts(tmp_path):
    proc = sweep(tmp_path / "sweep", "backbone.patch_size=7,5")
    assert proc.returncode == 2
    assert "1 of 2 sweep jobs have an invalid config; no job was started" in proc.stdout
    assert "backbone.patch_size=5 does not divide dataset.img_size=28" in proc.stdout
    assert not (tmp_path / "sweep").exists()


def test_sweep_partial_failure_summary_rerun_skips_finished_and_report(tmp_path):
    root = tmp_path / "sweep"
    # optim.blr=1e+30 passes validation and diverges in the first epoch: the job that fails
    proc = sweep(root, "optim.blr=1e-4,1e+30,1e-3")
    assert proc.returncode == 1
    assert "1 of 3 sweep jobs failed (the others finished)" in proc.stdout
    jobs = json.loads((root / "sweep_summary.json").read_text())["jobs"]
    assert [j["status"] for j in jobs] == ["completed", "failed", "completed"]
    failed = jobs[1]
    assert "optim.blr=1e+30" in failed["overrides"] and "non-finite loss" in failed["error"]
    assert Path(failed["log"]).is_file() and "non-finite loss" in Path(failed["log"]).read_text()
    assert all((Path(j["dir"]) / "metrics.json").is_file() for j in (jobs[0], jobs[2]))
    # the same sweep again: the finished jobs are skipped, the failed one is tried again
    again = sweep(root, "optim.blr=1e-4,1e+30,1e-3")
    assert again.returncode == 1
    jobs = json.loads((root / "sweep_summary.json").read_text())["jobs"]
    assert [j["status"] for j in jobs] == ["skipped", "failed", "skipped"]
    # the report: overrides -> final metrics, the failed job with its log, a plot
    report = subprocess.run([sys.executable, str(Path(__file__).parents[1] / "scripts/collect_results.py"), str(root)],
                            capture_output=True, text=True, timeout=120, env=ENV)
    assert report.returncode == 0, report.stderr
    table = (root / "results.md").read_text()
    assert "| optim.blr |" in table and "failed" in table and "knn/top1" in table
    assert (root / "results.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_sweep_through_the_submitit_launcher_records_a_failed_job(tmp_path):
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    root = tmp_path / "sweep"
    # submitit_local runs each job as a submitit job (a subprocess), as submitit_slurm does on a cluster
    proc = sweep(root, "hydra/launcher=submitit_local", "optim.blr=1e-3,1e+30")
    assert proc.returncode == 1, proc.stderr[-3000:]
    jobs = json.loads((root / "sweep_summary.json").read_text())["jobs"]
    assert [j["status"] for j in jobs] == ["completed", "failed"]
    assert "non-finite loss" in jobs[1]["error"]


# ------------------------------------------------------------------ corrupt inputs, end to end
def _image_folder(root: Path, n: int = 80) -> list[Path]:
    from PIL import Image

    root.mkdir(parents=True)
    g = torch.Generator().manual_seed(0)
    for i in range(n):
        Image.fromarray(torch.randint(0, 256, (28, 28), generator=g, dtype=torch.uint8).numpy()).save(root / f"{i:03d}.png")
    bad = [root / "010.png", root / "040.png", root / "070.png"]
    bad[0].write_bytes(b"")                                    # zero bytes
    bad[1].write_bytes(bad[1].read_bytes()[:100])              # truncated
    bad[2].write_text("not an image")                          # not an image
    return bad


FOLDER = [o for o in TINY if not o.startswith("dataset=")] + [
    "dataset=unlabeled_folder", "dataset.load_size=28", "dataset.img_size=28", "dataset.in_chans=1",
    "dataset.mean=[0.5]", "dataset.std=[0.5]", "trainer.max_epochs=1", "trainer.batch_size=16", "evaluator=[]",
    "eval.baseline=false", "logger=none"]


@pytest.mark.parametrize("workers", [0, 2])
def test_corrupt_files_are_skipped_and_counted(workers, tmp_path):
    from conftest import compose_cfg
    from vfm import pretrain as vpretrain

    _image_folder(tmp_path / "images")
    cfg = compose_cfg([*FOLDER, f"dataset.root={tmp_path / 'images'}", f"trainer.num_workers={workers}"], tmp_path / "run")
    vpretrain.run(cfg)
    state = final_state(tmp_path / "run")
    assert state["step"] == 5  # 80 files / 16: every batch full, the bad files replaced
    assert state["history"][-1]["skipped_files"] == 3


def test_corrupt_file_fails_naming_it_with_policy_fail(tmp_path):
    from conftest import compose_cfg
    from vfm import pretrain as vpretrain

    _image_folder(tmp_path / "images")
    cfg = compose_cfg([*FOLDER, f"dataset.root={tmp_path / 'images'}", "dataset.bad_files=fail"], tmp_path / "run")
    with pytest.raises(OSError, match="cannot decode image .*images/(010|040|070).png.*dataset.bad_files=skip"):
        vpretrain.run(cfg)
    assert not (tmp_path / "run/checkpoints/last.pt").exists()  # failed on the first bad batch
