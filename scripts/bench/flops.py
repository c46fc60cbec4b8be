"""FLOPs of a training step, and the model FLOPs utilisation (MFU) they give against a peak.

Counted with `torch.utils.flop_counter.FlopCounterMode`: matrix products, convolutions and
scaled-dot-product attention (2*M*N*K per product; SDPA's own formula, also for PyTorch's CPU flash
kernel, which the counter does not know by default). Elementwise and reduction ops are not FLOPs an
MFU is measured in."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from .common import Context
from .peak import device_datasheet_peak


def count_step_flops(fn: Callable[[], Any]) -> int:
    """FLOPs of `fn()` (a forward + backward) under FlopCounterMode, with PyTorch's CPU flash
    attention kernels counted like the CUDA ones (the counter has no formula for them)."""
    from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

    aten = torch.ops.aten
    custom: dict[Any, Any] = {}
    if hasattr(aten, "_scaled_dot_product_flash_attention_for_cpu"):
        def fwd(q, k, v, *args, out_shape=None, **kwargs):
            return sdpa_flop_count(q, k, v)

        def bwd(grad_out, q, k, v, *args, out_shape=None, **kwargs):
            return sdpa_backward_flop_count(grad_out, q, k, v)

        custom[aten._scaled_dot_product_flash_attention_for_cpu] = fwd
        custom[aten._scaled_dot_product_flash_attention_for_cpu_backward] = bwd
    with FlopCounterMode(display=False, custom_mapping=custom) as fc:
        fn()
    return int(fc.get_total_flops())


def mfu(ctx: Context, flops_per_img: float, img_s: float, precision: str) -> dict[str, float | None]:
    """Achieved TFLOP/s and its fraction of the measured peak of `precision` (and of the datasheet
    peak on a GPU that has one)."""
    achieved = flops_per_img * img_s / 1e12
    peak = ctx.peaks(precision)
    sheet = device_datasheet_peak(ctx, precision)
    return {"achieved_tflops": achieved, "peak_tflops": peak, "mfu": achieved / peak,
            "mfu_datasheet": achieved / sheet if sheet else None}
