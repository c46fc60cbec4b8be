"""Shared by every section: the machine's description, timing, peak memory and Markdown tables."""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import gc
import math
import os
import platform
import resource
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from .peak import Peaks

RECIPE_METHODS = ("dino", "ibot", "dinov2", "mae", "beit", "eva", "clip", "supervised")
DINO_FAMILY = ("dino", "ibot", "dinov2")
PRECISIONS = {"bf16": torch.bfloat16, "fp32": None}


@dataclass
class Context:
    """What every section gets: the parsed arguments, the device, the measured peaks, a scratch
    folder, and the results of the sections run so far (e2e reuses throughput's DINO row)."""

    args: argparse.Namespace
    device: torch.device
    name: str
    peaks: Peaks
    tmp: Path
    results: dict[str, Any] = field(default_factory=dict)


# ----------------------------------------------------------------------------------- the machine
def device_name(device: torch.device) -> str:
    """The GPU's name, or the CPU's model name with the matrix ISA extensions it has."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    name = platform.processor() or "unknown CPU"
    flags: set[str] = set()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and name in ("unknown CPU", platform.processor()):
                name = line.split(":", 1)[1].strip()
            if line.startswith("flags") and not flags:
                flags = set(line.split(":", 1)[1].split())
    isa = [label for flag, label in (("avx512f", "AVX-512"), ("avx512_bf16", "AVX512-BF16"), ("amx_bf16", "AMX-BF16"))
           if flag in flags]
    return f"{name}" + (f" ({', '.join(isa)})" if isa else "")


# ----------------------------------------------------------------------------------- timing
def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    dtype = PRECISIONS[precision]
    return contextlib.nullcontext() if dtype is None else torch.autocast(device.type, dtype=dtype)


def best_time(fn: Callable[[], Any], reps: int) -> float:
    """Fastest of `reps` calls, after one untimed call."""
    fn()
    best = math.inf
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def timed_device(fn: Callable[[], Any], steps: int, device: torch.device, warmup: int = 1) -> float:
    """Mean seconds per call over `steps` calls after `warmup`, the device synchronised around them."""
    for _ in range(warmup):
        fn()
    sync(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        fn()
    sync(device)
    return (time.perf_counter() - t0) / steps


def release(device: torch.device) -> None:
    """Free what the last measurement left, so the next one starts from the same memory."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


class PeakMemory:
    """CUDA: max_memory_allocated while active. CPU: growth of the resident set size over its
    value at entry (after glibc's malloc_trim), sampled every 10 ms (getrusage's high-water mark
    where /proc is missing)."""

    def __init__(self, device: torch.device) -> None:
        self.device, self.peak_bytes = device, 0
        self.kind = "CUDA max allocated" if device.type == "cuda" else "RSS growth"
        self._stop = threading.Event()

    @staticmethod
    def _rss() -> int:
        try:
            return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        except (OSError, ValueError, IndexError):
            return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

    def _sample(self) -> None:
        while not self._stop.wait(0.01):
            self._peak = max(self._peak, self._rss())

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            sync(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            gc.collect()
            with contextlib.suppress(OSError, AttributeError):  # glibc: hand freed heap pages back first
                ctypes.CDLL("libc.so.6").malloc_trim(0)
            self._base = self._peak = self._rss()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.device.type == "cuda":
            sync(self.device)
            self.peak_bytes = torch.cuda.max_memory_allocated(self.device)
        else:
            self._stop.set()
            self._thread.join()
            self.peak_bytes = max(self._peak, self._rss()) - self._base

    @property
    def mib(self) -> float:
        return self.peak_bytes / 2**20


# ----------------------------------------------------------------------------------- tables
def table(title: str, head: Sequence[str]) -> list[str]:
    """The first lines of a section's Markdown: its title, and the header of its table."""
    return [title, "", row(head), "|" + "---|" * len(head)]


def row(cells: Sequence[str]) -> str:
    return "| " + " | ".join(cells) + " |"


def one_line(text: str) -> str:
    """A note or an error fit for a table cell: one line, no column separators."""
    return " ".join(str(text).split()).replace("|", "/")
