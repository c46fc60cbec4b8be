"""Atomic checkpoints: write to a temporary file in the same directory, fsync, then rename.

A crash or a kill during `save_checkpoint` leaves either the previous file or the new one, never a
truncated file (rename is atomic on POSIX file systems).
"""

from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch


class CheckpointError(RuntimeError):
    pass


def save_checkpoint(state: dict[str, Any], path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return path


REQUIRED_KEYS = ("model", "optimizer", "scaler", "step", "epoch", "rng")


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist; check trainer.resume / checkpoint=")
    try:
        state = torch.load(path, map_location=map_location, weights_only=False)
    except Exception as e:  # a foreign or damaged file: name it
        raise CheckpointError(f"could not read checkpoint {path}: {e}") from e
    return state


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
