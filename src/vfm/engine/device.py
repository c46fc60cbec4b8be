"""Where and in which precision the training runs: the device, batches moved onto it, autocast."""

from __future__ import annotations

import functools
import json
import os
import platform
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import Any

import torch

from vfm import distributed as vdist
from vfm.io import atomic_write_json

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


# bf16 is chosen on a CPU only when it is clearly faster: near 1x the choice would flip between
# machines (and runs) on measurement noise, and fp32 is the exact one
BF16_MIN_SPEEDUP = 1.2
_MATMUL_SIZE = 1024


def _matmul_seconds(dtype: torch.dtype, repeats: int = 3) -> float:
    a, b = torch.randn(_MATMUL_SIZE, _MATMUL_SIZE).to(dtype), torch.randn(_MATMUL_SIZE, _MATMUL_SIZE).to(dtype)
    a @ b  # warm-up: first-call dispatch and packing
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    return (time.perf_counter() - start) / repeats


def _cpu_key() -> str:
    """This machine as far as matrix-product speed goes: CPU model, torch version, threads."""
    model = platform.processor() or platform.machine()
    try:
        model = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                     if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{model} | torch {torch.__version__} | {torch.get_num_threads()} threads"


def _cache_file() -> Path:
    return Path(os.environ.get("VFM_CACHE_DIR", Path.home() / ".cache" / "vfm")) / "cpu_bf16_speedup.json"


@functools.cache
def cpu_bf16_speedup() -> float:
    """How many times faster a 1024^2 bf16 matrix product runs than fp32 on this CPU: measured
    once per machine (~0.1 s) and kept in `~/.cache/vfm/cpu_bf16_speedup.json` (or
    `$VFM_CACHE_DIR`), so every run on the machine makes the same choice. CPU flags do not
    decide it: AMX-BF16 gives ~2x, but so does AVX512-BF16 on AMD Zen 4 (measured 2.2x), while
    an AVX512-BF16 Xeon without AMX runs bf16 at ~0.5x."""
    path, key = _cache_file(), _cpu_key()
    try:
        cached = json.loads(path.read_text())
    except (OSError, ValueError):
        cached = {}
    if isinstance(cached, dict) and isinstance(cached.get(key), (int, float)):
        return float(cached[key])
    speedup = _matmul_seconds(torch.float32) / _matmul_seconds(torch.bfloat16)
    try:
        atomic_write_json(path, {**(cached if isinstance(cached, dict) else {}), key: speedup})
    except OSError:  # a read-only home: measure again next time
        pass
    return speedup


def resolve_precision(precision: str, device: torch.device) -> tuple[str, str]:
    """The precision to train or evaluate in on `device`, and why: `(key of PRECISIONS, reason)`.

    "auto" is bf16 where a bf16 matrix product is faster than fp32 (a CUDA device with native
    bf16, Ampere or later; a CPU where `cpu_bf16_speedup` measures >= 1.2x), else fp32 (fp16
    needs a loss scaler, so it is only used when asked for). An explicit "fp32", "bf16" or
    "fp16" is returned as given.
    """
    if precision not in PRECISION_CHOICES:
        raise ValueError(f"precision must be one of {list(PRECISION_CHOICES)}, got {precision!r}")
    if precision == "bf16" and device.type == "cpu" and cpu_bf16_speedup() < 1.0:
        return precision, f"as configured; this CPU runs bf16 matrix products at {cpu_bf16_speedup():.2f}x fp32"
    if precision != "auto":
        return precision, "as configured"
    if device.type == "cuda":
        with torch.cuda.device(device):
            native = torch.cuda.is_bf16_supported(including_emulation=False)
        if native:
            return "bf16", "CUDA device with bf16 support"
        return "fp32", "CUDA device without native bf16 support"
    if device.type == "cpu":
        speedup = cpu_bf16_speedup()
        chosen = "bf16" if speedup >= BF16_MIN_SPEEDUP else "fp32"
        return chosen, f"this CPU runs bf16 matrix products at {speedup:.2f}x fp32"
    return "fp32", f"{device.type} device: bf16 is chosen automatically only on CUDA and on CPUs where it is faster"


def describe_precision(precision: str, chosen: str, reason: str) -> str:
    """The start-up log line, e.g. "precision auto -> fp32 (this CPU runs bf16 matrix products at 0.50x fp32)"."""
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
