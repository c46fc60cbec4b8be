"""Where and in which precision the training runs: the device, batches moved onto it, autocast."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from typing import Any

import torch

from vfm import distributed as vdist

PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def select_device(device: str) -> torch.device:
    """"auto" picks cuda (this process's local GPU under torchrun) when present, else cpu."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError("trainer.device=cuda but no CUDA device is visible; use trainer.device=auto or cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and dev.index is None and vdist.is_dist():
        dev = torch.device("cuda", torch.cuda.current_device())
    return dev


def map_tensors(fn: Callable[[torch.Tensor], torch.Tensor], batch: Any) -> Any:
    """`batch` with `fn` applied to every tensor inside its dicts, lists and tuples (the
    containers keep their types; anything else, such as a seed or a caption, is left as it is)."""
    if isinstance(batch, torch.Tensor):
        return fn(batch)
    if isinstance(batch, dict):
        return {k: map_tensors(fn, v) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(map_tensors(fn, v) for v in batch)
    return batch


def to_device(batch: Any, device: torch.device) -> Any:
    """Every tensor of `batch` on `device` (asynchronous from pinned host memory)."""
    return map_tensors(lambda t: t.to(device, non_blocking=True), batch)


def _nhwc(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous(memory_format=torch.channels_last) if t.ndim == 4 and t.is_floating_point() else t


def channels_last_batch(batch: Any) -> Any:
    """4-D float tensors of a batch (images, crops) in NHWC memory format."""
    return map_tensors(_nhwc, batch)


def autocast(precision: str, device: torch.device) -> AbstractContextManager:
    """Mixed precision for the forward pass: `precision` is a key of `PRECISIONS`."""
    dtype = PRECISIONS[precision]
    if dtype is None:
        return nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)
