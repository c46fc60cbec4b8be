"""Where and in which precision the training runs: the device, batches moved onto it, autocast."""

from __future__ import annotations

import functools
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import Any

import torch

from vfm import distributed as vdist

PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
# what `trainer.precision` / `eval.precision` accept: "auto" is resolved by `resolve_precision`
PRECISION_CHOICES = ("auto", *PRECISIONS)


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


@functools.cache
def cpu_has_amx_bf16() -> bool:
    """Whether this CPU has AMX-BF16 tiles (Intel Sapphire Rapids and later), read from its
    capability flags: torch's cpuinfo where this torch exposes it, else Linux's /proc/cpuinfo;
    False when neither says. Only with AMX is a bf16 matrix product faster than fp32 on a CPU:
    AVX512-BF16 alone (AMD Zen 4, Cooper Lake) runs it at about half the fp32 rate."""
    capabilities = getattr(torch.cpu, "get_capabilities", None)
    if capabilities is not None:
        return bool(capabilities().get("amx_bf16", False))
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return any(line.startswith("flags") and "amx_bf16" in line.split() for line in text.splitlines())


def resolve_precision(precision: str, device: torch.device) -> tuple[str, str]:
    """The precision to train or evaluate in on `device`, and why: `(key of PRECISIONS, reason)`.

    "auto" is bf16 where a bf16 matrix product is faster than fp32 (a CUDA device with native
    bf16, Ampere or later; a CPU with AMX-BF16), else fp32 (fp16 needs a loss scaler, so it is
    only used when asked for). An explicit "fp32", "bf16" or "fp16" is returned as given.
    """
    if precision not in PRECISION_CHOICES:
        raise ValueError(f"precision must be one of {list(PRECISION_CHOICES)}, got {precision!r}")
    if precision == "bf16" and device.type == "cpu" and not cpu_has_amx_bf16():
        return precision, "as configured; without AMX-BF16 this CPU runs bf16 slower than fp32"
    if precision != "auto":
        return precision, "as configured"
    if device.type == "cuda":
        with torch.cuda.device(device):
            native = torch.cuda.is_bf16_supported(including_emulation=False)
        if native:
            return "bf16", "CUDA device with bf16 support"
        return "fp32", "CUDA device without native bf16 support"
    if device.type == "cpu":
        if cpu_has_amx_bf16():
            return "bf16", "CPU with AMX-BF16"
        return "fp32", "CPU without AMX-BF16: bf16 matrix products are slower than fp32 here"
    return "fp32", f"{device.type} device: bf16 is chosen automatically only on CUDA and on AMX-BF16 CPUs"


def describe_precision(precision: str, chosen: str, reason: str) -> str:
    """The start-up log line, e.g. "precision auto -> fp32 (CPU without AMX-BF16: ...)"."""
    if precision == chosen:
        return f"precision {chosen} ({reason})"
    return f"precision {precision} -> {chosen} ({reason})"


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
    """Mixed precision for the forward pass: `precision` is a key of `PRECISIONS` ("auto" is
    resolved first, by `resolve_precision`)."""
    dtype = PRECISIONS[precision]
    if dtype is None:
        return nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)
