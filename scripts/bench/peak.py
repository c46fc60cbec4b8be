"""`peak`: the device's dense matmul rate measured in this run: an n x n x n product (CPU n=4096,
CUDA n=8192) in each precision (fp32, bf16), best of several timed repeats after warmup,
2 n^3 FLOPs per product. Every MFU below is relative to this *measured* peak of the precision
the step runs its matrix products in (bf16 autocast -> bf16 peak; fp32 -> fp32 peak, with CUDA's
TF32 setting as it is); on CUDA also relative to the datasheet dense peak when the device is an
H100 SXM or H200 (989 TFLOP/s bf16; fp32 67, or 494.5 with TF32 on)."""

from __future__ import annotations

import math
import time
from typing import Any

import torch

from .common import Context, row, sync, table

# dense (no sparsity) tensor-core peaks from NVIDIA's datasheets, TFLOP/s
DATASHEET = {"bf16": 989.0, "fp32": 67.0, "tf32": 494.5}


def datasheet_peak(name: str, precision: str) -> float | None:
    """Datasheet dense peak (TFLOP/s) for an H100 SXM or H200, else None."""
    n = name.upper()
    if not ("H200" in n or ("H100" in n and "PCIE" not in n and "NVL" not in n)):
        return None
    if precision == "fp32":
        return DATASHEET["tf32"] if torch.backends.cuda.matmul.allow_tf32 else DATASHEET["fp32"]
    return DATASHEET[precision]


def device_datasheet_peak(ctx: Context, precision: str) -> float | None:
    """The datasheet peak of this run's device: CUDA only (a CPU has none we compare with)."""
    return datasheet_peak(ctx.name, precision) if ctx.device.type == "cuda" else None


def matmul_peak(device: torch.device, precision: str, n: int, repeats: int = 5) -> float:
    """Best-of-`repeats` TFLOP/s of an n x n x n product after warmup (2 n^3 FLOPs each)."""
    dtype = torch.float32 if precision == "fp32" else torch.bfloat16
    gen = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(n, n, device=device, dtype=dtype, generator=gen)
    b = torch.randn(n, n, device=device, dtype=dtype, generator=gen)
    inner = 10 if device.type == "cuda" else 1
    for _ in range(3 if device.type == "cuda" else 1):
        for _ in range(inner):
            a @ b
    best = math.inf
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        for _ in range(inner):
            a @ b
        sync(device)
        best = min(best, (time.perf_counter() - t0) / inner)
    return 2 * n**3 / best / 1e12


class Peaks:
    """Measured matmul peaks, per precision, measured once per run (lazily when `peak` is not run)."""

    def __init__(self, device: torch.device, n: int) -> None:
        self.device, self.n, self.values = device, n, {}

    def __call__(self, precision: str) -> float:
        if precision not in self.values:
            self.values[precision] = matmul_peak(self.device, precision, self.n)
        return self.values[precision]


def section_peak(ctx: Context) -> dict[str, Any]:
    rows = []
    for precision in ("fp32", "bf16"):
        tflops = ctx.peaks(precision)
        label = precision
        if precision == "fp32" and ctx.device.type == "cuda":
            label += " (TF32 on)" if torch.backends.cuda.matmul.allow_tf32 else " (TF32 off)"
        rows.append({"precision": precision, "label": label, "n": ctx.peaks.n, "tflops": tflops,
                     "datasheet_tflops": device_datasheet_peak(ctx, precision)})
    md = table(f"### Dense matmul peak, measured ({ctx.name})",
               ["precision", "product", "measured TFLOP/s (best of 5)", "datasheet TFLOP/s"])
    for r in rows:
        sheet = f"{r['datasheet_tflops']:.1f}" if r["datasheet_tflops"] else "—"
        md.append(row([r["label"], f"{r['n']}^3", f"{r['tflops']:.3f}", sheet]))
    return {"rows": rows, "markdown": "\n".join(md)}
