"""Graceful stops on SIGTERM / SIGUSR1: checkpoint at the next step boundary, then exit.

Clusters warn before they take a machine away: SLURM sends SIGTERM on preemption or `scancel`,
and, with `#SBATCH --signal=USR1@120`, SIGUSR1 two minutes before the time limit; Kubernetes and
torchrun send SIGTERM. The handler only sets a flag (a signal may arrive in the middle of a
collective or of a `torch.save`); the training loop checks it after each optimisation step, agrees
on it across processes, writes `last.pt` and raises `Preempted`. Re-running the same command
resumes exactly there. Repeats are absorbed: a process can get the same SIGTERM twice (from SLURM
and from torchrun forwarding it), and the second must not kill it mid-checkpoint. Ctrl-C
(SIGINT) is not caught and still stops at once.

After SIGUSR1 inside a SLURM job, `requeue_slurm_job` puts the job back in the queue
(`scontrol requeue`), so a job submitted with `--requeue` continues by itself after the time limit.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import subprocess
import threading
from types import FrameType, TracebackType

log = logging.getLogger(__name__)

DEFAULT_SIGNALS = ("SIGTERM", "SIGUSR1")


class Preempted(RuntimeError):
    """Training stopped on a signal after writing `last.pt`; `exit_code` is 128 + the signal number,
    what a shell reports for a process ended by that signal."""

    def __init__(self, signum: int, step: int, checkpoint: str) -> None:
        self.signum, self.step, self.checkpoint = signum, step, checkpoint
        self.exit_code = 128 + signum
        super().__init__(
            f"stopped by {signal.Signals(signum).name} after step {step}; {checkpoint} holds that step. "
            "Re-run the same command to resume from it."
        )


class StopOnSignal:
    """Context manager: while active, the listed signals set `signum` instead of killing the process.

    Only the main thread may install handlers (a run inside a thread keeps the defaults).
    """

    def __init__(self, signals: tuple[str, ...] = DEFAULT_SIGNALS) -> None:
        self.signals = tuple(getattr(signal, s) if isinstance(s, str) else s for s in signals)
        self.signum: int | None = None
        self._previous: dict[int, object] = {}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.signum is not None:
            return
        self.signum = signum
        log.warning("received %s: stopping after this step (checkpoint, then exit)", signal.Signals(signum).name)

    def __enter__(self) -> StopOnSignal:
        if threading.current_thread() is threading.main_thread():
            for s in self.signals:
                self._previous[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, exc_type: type | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)  # type: ignore[arg-type]
        self._previous.clear()


def requeue_slurm_job() -> bool:
    """`scontrol requeue $SLURM_JOB_ID` if this is a SLURM job; True if the job was requeued."""
    job = os.environ.get("SLURM_ARRAY_JOB_ID") and f"{os.environ['SLURM_ARRAY_JOB_ID']}_{os.environ.get('SLURM_ARRAY_TASK_ID')}"
    job = job or os.environ.get("SLURM_JOB_ID")
    if not job or shutil.which("scontrol") is None:
        return False
    proc = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True)
    if proc.returncode != 0:
        log.error("scontrol requeue %s failed: %s", job, proc.stderr.strip())
        return False
    log.warning("requeued SLURM job %s; it resumes from the last checkpoint when it starts again", job)
    return True
