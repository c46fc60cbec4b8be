"""What a fine-tuning run keeps across calls (`vfm.evaluators.finetune`): the fingerprint that
decides whether a checkpoint in its directory may be resumed, and the weights selected on val.

The engine's checkpoint (`checkpoints/last.pt`) carries the fingerprint of the settings and of the
encoder's weights; a run refuses to continue one written otherwise. `best.pt` holds the weights of
the epoch with the best val top-1 so far, saved by the engine's per-epoch `evaluate_fn`
(`ValSelection`); a resumed run reads the selection back from it.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from vfm.engine.checkpoint import CheckpointError
from vfm.io import UnreadableFileError, atomic_torch_save, load_torch

__all__ = ["FORMAT", "ValSelection", "check_fingerprint", "weights_digest"]

#: The format tag of the fine-tuning state in the engine's checkpoint and in `best.pt`.
FORMAT = "vfm.finetune/2"


def weights_digest(module: nn.Module) -> str:
    """SHA-1 of `module`'s state (names, dtypes, shapes, bytes): tells a checkpoint fine-tuned
    from other weights of the same architecture (e.g. a longer pretraining run) from ours."""
    h = hashlib.sha1()
    for name, t in module.state_dict().items():
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()


def check_fingerprint(state: Any, fingerprint: dict[str, Any], path: Path) -> None:
    """Refuse to resume from a file that is not ours or was written with other settings."""
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a fine-tuning checkpoint ({FORMAT}); delete it or use another "
                              f"checkpoint_dir")
    saved = state.get("fingerprint", {})
    diffs = [f"{k}: {saved.get(k)!r} in the checkpoint, {v!r} now" for k, v in fingerprint.items() if saved.get(k) != v]
    if diffs:
        raise CheckpointError(
            f"refusing to resume fine-tuning from {path}: it was written with other settings or another encoder "
            f"({'; '.join(diffs)}). Delete {path.parent} to start over, or use another checkpoint_dir (run directory)"
        )


class ValSelection:
    """`Trainer.fit`'s `evaluate_fn` (rank 0, after every epoch): val top-1, and with `select` a
    strict improvement (the earliest of tied epochs: deterministic) saves the weights to `path`
    with the fingerprint, so that a resumed run keeps the selection."""

    def __init__(self, score: Callable[[], float], model: nn.Module, path: Path, fingerprint: dict[str, Any],
                 select: bool) -> None:
        self.score, self.model, self.path, self.fingerprint, self.select = score, model, path, fingerprint, select
        self.best_top1, self.best_epoch = -math.inf, 0

    def restore(self, resumed: bool) -> None:
        """Resumed: the selection so far. Starting over: a `best.pt` of an attempt that wrote no
        checkpoint is stale. (One newer than the checkpoint, written just before a crash, is kept:
        the replayed epochs reach it again and, not strictly better, keep it.)"""
        if not self.path.is_file():
            return
        if not resumed:
            self.path.unlink()
            return
        try:
            state = load_torch(self.path)
        except UnreadableFileError as e:  # damaged: one line naming it, as for the engine's checkpoint
            raise CheckpointError(f"{e}; delete {self.path.parent} to start fine-tuning over") from e
        check_fingerprint(state, self.fingerprint, self.path)
        self.best_top1, self.best_epoch = float(state["top1"]), int(state["epoch"])

    def __call__(self, encoder: nn.Module, epoch: int) -> dict[str, float]:
        top1 = self.score()
        if self.select and top1 > self.best_top1:
            self.best_top1, self.best_epoch = top1, epoch
            atomic_torch_save({"format": FORMAT, "fingerprint": self.fingerprint, "epoch": epoch, "top1": top1,
                               "model": self.model.state_dict()}, self.path)
        return {"finetune/val_top1": top1}

    def load_best(self) -> int:
        """Put the selected weights into the model; their epoch (0 when nothing was selected)."""
        if self.select and self.best_epoch > 0:
            self.model.load_state_dict(load_torch(self.path)["model"])
            return self.best_epoch
        return 0
