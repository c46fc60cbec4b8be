"""Atomic checkpoints: write to a temporary file in the same directory, fsync, then rename.

A crash or a kill during `save_checkpoint` leaves either the previous file or the new one, never a
truncated file (rename is atomic on POSIX file systems). A write that fails (a full disk) removes
its temporary file and leaves the previous checkpoint in place. `find_resume_checkpoint` reads the
newest checkpoint that loads, so a file damaged outside our control (a copy cut short, a bad
disk) is skipped with a warning instead of ending the run or, worse, being trained from.
"""

from __future__ import annotations

import logging
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vfm.io import UnreadableFileError, atomic_write, load_torch

log = logging.getLogger(__name__)


class CheckpointError(RuntimeError):
    pass


def save_checkpoint(state: dict[str, Any], path: str | Path) -> Path:
    """Write `state` to `path` atomically and durably; on failure the previous `path` is untouched
    and the temporary file is removed (a full disk must not also fill it with a torn file)."""
    path = Path(path)
    try:
        return atomic_write(path, lambda f: torch.save(state, f), durable=True)
    except OSError as e:
        raise CheckpointError(
            f"could not write checkpoint {path}: {e}. The previous {path.name} (if any) is intact; "
            f"free space in {path.parent} and re-run the same command to resume from it"
        ) from e


def remove_stale_temporaries(directory: str | Path) -> list[Path]:
    """Delete `.NAME.tmp-PID` files (`vfm.io.temporary_name`) left by a process killed while
    writing (they are never read)."""
    directory = Path(directory)
    removed = [p for p in directory.glob(".*.tmp-*") if p.is_file()] if directory.is_dir() else []
    for p in removed:
        p.unlink(missing_ok=True)
    return removed


REQUIRED_KEYS = ("model", "optimizer", "scaler", "step", "epoch", "rng")


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """The state saved at `path`, read by `vfm.io.load_torch` (weights and plain types only).

    A file that is damaged or not a checkpoint raises `CheckpointError` (resume skips it for an
    older one); one that would run code raises `vfm.io.UntrustedFileError`, a config error that
    is never skipped: someone put it there, and the user decides (`VFM_TRUST_CHECKPOINTS=1`).
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist; check trainer.resume / checkpoint=")
    try:
        return load_torch(path, map_location=map_location)
    except UnreadableFileError as e:  # a foreign or damaged file
        raise CheckpointError(str(e)) from e


def find_resume_checkpoint(directory: str | Path) -> tuple[Path, dict[str, Any]] | None:
    """The newest readable checkpoint in `directory` and its state; None if there is none, an
    error if there are some but none can be read.

    Candidates are `last.pt` and the periodic `epoch_XXXX.pt`, newest first (by modification
    time, so `last.pt` wins a tie). One that does not load or lacks the training state (truncated
    by a copy, damaged on disk) is skipped with a warning naming it, and the next one is used.
    """
    directory = Path(directory)
    if not directory.is_dir():
        return None
    candidates = [p for p in directory.glob("*.pt") if p.name == "last.pt" or p.name.startswith("epoch_")]
    candidates.sort(key=lambda p: (p.stat().st_mtime_ns, p.name == "last.pt"), reverse=True)
    for path in candidates:
        try:
            state = load_checkpoint(path)
            if not isinstance(state, dict):
                raise CheckpointError(f"checkpoint {path} holds a {type(state).__name__}, not a training state")
            check_keys(state, path)
        except CheckpointError as e:
            log.warning("not resuming from %s: %s; trying an older checkpoint", path, e)
            continue
        return path, state
    if candidates:  # starting over would silently throw the run away: let the user decide
        raise CheckpointError(
            f"none of the {len(candidates)} checkpoint(s) in {directory} can be read ({', '.join(p.name for p in candidates)}); "
            "move them away or pass trainer.resume=never to start this run from scratch"
        )
    return None


def resume_state(resume: str | None, directory: str | Path, is_main: bool) -> tuple[Path, dict[str, Any]] | None:
    """The checkpoint a run continues from (`trainer.resume`): with "auto" the newest readable one
    in `directory` (rank 0 first deletes the temporaries of interrupted writes), with a path that
    file (which must be readable: the user asked for it), with "never" none."""
    if resume in ("never", "", None):
        return None
    if resume == "auto":
        if is_main:
            for p in remove_stale_temporaries(directory):
                log.info("removed %s, left by a process killed while writing it", p)
        return find_resume_checkpoint(directory)
    path = Path(resume)
    state = load_checkpoint(path)
    check_keys(state, path)
    return path, state


def check_keys(state: dict[str, Any], path: str | Path, required: tuple[str, ...] = REQUIRED_KEYS) -> None:
    missing = [k for k in required if k not in state]
    if missing:
        raise CheckpointError(f"checkpoint {path} is missing {missing}; it was not written by `pretrain` of this version")


def load_model_state(module: torch.nn.Module, state: dict[str, torch.Tensor], path: str | Path) -> None:
    """Strict load whose error names the missing and unexpected keys."""
    result = module.load_state_dict(state, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise CheckpointError(
            f"checkpoint {path} does not match the model: missing keys {result.missing_keys[:10]}"
            f"{' ...' if len(result.missing_keys) > 10 else ''}, unexpected keys {result.unexpected_keys[:10]}"
            f"{' ...' if len(result.unexpected_keys) > 10 else ''}. Was it written with the same method/backbone config?"
        )


def rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
