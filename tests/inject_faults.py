"""Run `vfm.pretrain` with one fault injected, for the fault tests (tests/test_faults.py).

    VFM_FAULT="kill_at_step=5,rank=1" python tests/inject_faults.py OVERRIDES...
    VFM_FAULT="..." python -m torch.distributed.run --nproc_per_node=2 tests/inject_faults.py OVERRIDES...

Faults (one per run; `rank=R` limits it to one process, default all):
    kill_at_step=K          SIGKILL this process once optimisation step K has been taken
    kill_in_checkpoint=N    SIGKILL this process halfway through writing its N-th checkpoint
    signal_at_step=K,sig=S  send signal S (USR1, TERM) to this process at step K
    nan_at_micro=M          the M-th micro-batch (0-based) of this process holds NaNs
    hang_at_step=K          this process stops answering (sleeps) at step K
    hang_before_init        this process never joins the process group
    kill_worker_at=I        a DataLoader worker SIGKILLs itself when it loads its I-th item
    hang_worker_at=I        a DataLoader worker hangs when it loads its I-th item

With `VFM_RECORD_BATCHES=DIR` (any fault or none) every process appends one line per micro-batch
it trains on to `DIR/<pid>.txt`: `step rank seed index index ...` (the optimisation step, the
batch seed, the dataset indices), which is how the elastic-resume tests compare sample orders.

The production code has no test hooks: the faults are monkeypatches applied here, before
`vfm.pretrain.main` runs.
"""

from __future__ import annotations

import os
import signal
import sys
import time

import torch
import torch.utils.data

import vfm.data.sampler as vsampler
import vfm.distributed as vdist
import vfm.engine.checkpoint as vckpt
import vfm.engine.trainer as vtrainer


def _spec() -> dict[str, str]:
    raw = os.environ.get("VFM_FAULT", "")
    return dict(kv.split("=", 1) if "=" in kv else (kv, "") for kv in raw.split(",") if kv)


def _die() -> None:
    sys.stdout.flush()
    sys.stderr.flush()
    os.kill(os.getpid(), signal.SIGKILL)


def install(spec: dict[str, str]) -> None:
    if "rank" in spec and int(os.environ.get("RANK", "0")) != int(spec["rank"]):
        return

    # steps: the trainer clips gradients once per optimisation step, after the backward pass
    steps = {"n": 0}
    real_clip = vtrainer.clip_gradients

    def clip_and_count(*a, **k):
        out = real_clip(*a, **k)
        steps["n"] += 1
        k_ = steps["n"]
        if "kill_at_step" in spec and k_ == int(spec["kill_at_step"]):
            _die()
        if "signal_at_step" in spec and k_ == int(spec["signal_at_step"]):
            os.kill(os.getpid(), getattr(signal, "SIG" + spec.get("sig", "USR1")))
        if "hang_at_step" in spec and k_ == int(spec["hang_at_step"]):
            time.sleep(3600)
        return out

    vtrainer.clip_gradients = clip_and_count

    if "kill_in_checkpoint" in spec:
        saves = {"n": 0}
        real_save = torch.save

        def torn_save(obj, f, *a, **k):
            saves["n"] += 1
            if saves["n"] == int(spec["kill_in_checkpoint"]) and hasattr(f, "truncate"):
                real_save(obj, f, *a, **k)
                f.truncate(f.tell() // 2)  # half of the bytes are on disk when the machine dies
                f.flush()
                _die()
            return real_save(obj, f, *a, **k)

        vckpt.torch.save = torn_save  # type: ignore[attr-defined]

    if "nan_at_micro" in spec:
        micro = {"n": -1}
        real_to_device = vtrainer.to_device

        def poisoned(batch, device):
            if not (isinstance(batch, dict) and "crops" in batch):  # to_device recurses into the batch
                return real_to_device(batch, device)
            micro["n"] += 1
            out = real_to_device(batch, device)
            if micro["n"] == int(spec["nan_at_micro"]):
                out["crops"] = [torch.full_like(c, float("nan")) for c in out["crops"]]
            return out

        vtrainer.to_device = poisoned

    if "hang_before_init" in spec:
        def never(*a, **k):
            time.sleep(3600)

        vdist.init_distributed = never

    if "kill_worker_at" in spec or "hang_worker_at" in spec:
        real_get = vsampler.SeededDataset.__getitem__
        loaded = {"n": 0}

        def faulty_get(self, key):
            if torch.utils.data.get_worker_info() is not None:
                loaded["n"] += 1
                if loaded["n"] == int(spec.get("kill_worker_at", -1)):
                    _die()
                if loaded["n"] == int(spec.get("hang_worker_at", -1)):
                    time.sleep(3600)
            return real_get(self, key)

        vsampler.SeededDataset.__getitem__ = faulty_get


def record_batches(directory: str) -> None:
    """Log the indices and seed of every micro-batch this process trains on, with its step."""
    from collections import deque

    queue: deque = deque()  # batches the sampler handed out, not yet trained on (prefetch keeps it short)
    path = os.path.join(directory, f"{os.getpid()}.txt")
    real_iter, real_fb = vsampler.SeededBatchSampler.__iter__, vtrainer.Trainer._forward_backward

    def iter_and_queue(self):
        queue.clear()  # a new epoch: what the last one prefetched is never trained on
        for batch in real_iter(self):
            queue.append(batch)
            yield batch

    def forward_backward_and_log(self, run, batch, sched, last_micro):
        keys = queue.popleft()
        out = real_fb(self, run, batch, sched, last_micro)
        line = f"{run.step} {run.strategy.rank} {keys[0][1]} " + " ".join(str(i) for i, _ in keys) + "\n"
        with open(path, "a") as f:  # closed at once: a SIGKILL right after loses nothing
            f.write(line)
        return out

    vsampler.SeededBatchSampler.__iter__ = iter_and_queue
    vtrainer.Trainer._forward_backward = forward_backward_and_log


if __name__ == "__main__":
    if os.environ.get("VFM_RECORD_BATCHES"):
        record_batches(os.environ["VFM_RECORD_BATCHES"])
    install(_spec())
    from vfm.pretrain import main

    sys.argv[0] = "pretrain"
    main()
