"""One measurement: build a method from its config, time its collate on the CPU (`data`) and its
training step on the device (`compute`: forward, backward, gradient clipping,
`before_optimizer_step`, the optimizer step and `on_step_end`, with the schedules' values of steps
0..N and the trainer's one loss read-back per step), count its FLOPs and its peak memory."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from .common import Context, PeakMemory, autocast, release, sync
from .configs import (
    build_collate,
    compose_cfg,
    default_batch,
    describe_views,
    make_samples,
    mim_artifacts,
    sched_values,
)
from .flops import count_step_flops, mfu

OPT_NAMES = {"forloop": "for-loop", "foreach": "foreach", "fused": "fused"}


@dataclass
class Spec:
    """One configuration to measure; the defaults are the project's own behaviour."""

    method: str
    overrides: list[str]
    batch: int | None = None
    precision: str = "bf16"
    compile: bool = False
    optimizer: str = "default"  # default (OptimSpec: foreach on CPU, fused on CUDA) | foreach | fused | forloop
    attention: str | None = None  # None: the project's choice; "fused" | "manual": everywhere in the method
    channels_last: bool = False
    mae_encode_all: bool = False  # MAE: the encoder runs on every patch, the decoder gets the visible ones
    count_flops: bool = True
    measure_data: bool = True
    steps: int = 5
    warmup: int = 2
    label: str = ""
    extra: dict[str, Any] = field(default_factory=dict)


def build_optimizer(kind: str, optim: Any, method: torch.nn.Module, device: torch.device) -> torch.optim.Optimizer:
    if kind == "default" or optim.name != "adamw":
        return optim.build(method.param_groups(), device.type)
    groups = [g for g in method.param_groups() if len(g["params"]) > 0]
    kw: dict[str, Any] = dict(lr=0.0, betas=optim.betas, eps=optim.eps, weight_decay=0.0)
    if kind == "fused":
        return torch.optim.AdamW(groups, fused=True, **kw)
    if kind == "foreach":
        return torch.optim.AdamW(groups, foreach=True, **kw)
    if kind == "forloop":
        return torch.optim.AdamW(groups, foreach=False, fused=False, **kw)
    raise ValueError(f"unknown optimizer kind {kind!r}")


def set_attention(method: torch.nn.Module, fused: bool) -> None:
    """The same attention everywhere in the method. timm reads `timm.layers.set_fused_attn` once, at
    module construction, into each Attention's `fused_attn`; vfm's Backbone then overwrites its own
    modules' flags on the first forward from `backbone.attn_impl` ("auto": fused on GPU, plain ops on
    CPU) and leaves other timm blocks (the MAE decoder) at timm's default (fused). So: set
    `attn_impl` on every Backbone and the flag on every other attention module."""
    from vfm.backbones import Backbone

    backbone_modules = set()
    for m in method.modules():
        if isinstance(m, Backbone):
            m.attn_impl = "fused" if fused else "manual"
            m._attn_device = None  # re-select on the next forward
            backbone_modules.update(id(x) for x in m.modules())
    for m in method.modules():
        if hasattr(m, "fused_attn") and id(m) not in backbone_modules:
            m.fused_attn = fused


def fused_attention_share(method: torch.nn.Module) -> str:
    flags = [bool(m.fused_attn) for m in method.modules() if hasattr(m, "fused_attn")]
    return f"{sum(flags)}/{len(flags)} attention modules fused"


def _encode_all(mae: torch.nn.Module) -> Callable:
    """MAE's forward_encoder with the encoder on every patch: the visible tokens are picked after
    the encoder, so the decoder and the loss see exactly what they see normally."""

    def forward_encoder(images: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        ids_keep, ids_restore = mae.random_masking(mask)
        b, n = mask.shape
        everything = torch.arange(n, device=mask.device).expand(b, n)
        tokens = mae.backbone.forward_visible(images, everything)["tokens"]
        p = mae.backbone.num_prefix_tokens
        idx = ids_keep.unsqueeze(-1).expand(-1, -1, tokens.shape[-1])
        return torch.cat([tokens[:, :p], torch.gather(tokens[:, p:], 1, idx)], dim=1), ids_restore

    return forward_encoder


def measure(ctx: Context, spec: Spec) -> dict[str, Any]:
    """Build the method, time its collate and its training step; see the module docstring."""
    try:
        return _measure(ctx, spec)
    finally:
        release(ctx.device)


def _measure(ctx: Context, spec: Spec) -> dict[str, Any]:
    from hydra.utils import instantiate

    device = ctx.device
    cfg = compose_cfg(spec.overrides)
    if spec.method in ("beit", "eva", "eva02"):
        cfg = compose_cfg(spec.overrides + mim_artifacts(cfg, spec.method, ctx.tmp, ctx.args.quick))
    batch = spec.batch or default_batch(spec.method, cfg, ctx.args, device)
    out: dict[str, Any] = {
        "method": spec.method, "label": spec.label, "backbone": str(cfg.backbone.name),
        "patch_size": cfg.backbone.get("patch_size"), "img_size": int(cfg.dataset.img_size), "batch": batch,
        "precision": spec.precision, "compile": spec.compile, "optimizer": spec.optimizer,
        "overrides": spec.overrides, **spec.extra,
    }
    mem = PeakMemory(device)
    with mem:
        method, collate = _build(cfg, spec, device)
        out["views"] = describe_views(collate, cfg)
        batches, data_s = _time_collate(collate, cfg, spec, batch, ctx)
        out["data_s"] = data_s if spec.measure_data else None
        optim = instantiate(cfg.optim)
        optimizer = build_optimizer(spec.optimizer, optim, method, device)
        sv = sched_values(cfg, optim, batch, spec.warmup + spec.steps + 1, int(cfg.dataset.img_size) > 32)
        if spec.count_flops:
            out["flops_per_img"] = _step_flops(method, batches[0], sv, spec.precision, device) / batch
            optimizer.zero_grad(set_to_none=True)
        step = _train_step(method, optimizer, optim, batches, sv, spec, device)
        warm_s, compute_s = _time_steps(step, spec, device)
    out["attention"] = fused_attention_share(method)
    return _summarise(ctx, spec, out, batch, warm_s, compute_s, mem)


def _build(cfg: Any, spec: Spec, device: torch.device) -> tuple[torch.nn.Module, Callable]:
    """The method, on the device in training mode with the spec's variations, and its collate."""
    from vfm.pretrain import build_method

    method = build_method(cfg)
    collate = build_collate(cfg, method)
    if spec.mae_encode_all:
        method.forward_encoder = _encode_all(method)
    if spec.attention is not None:
        set_attention(method, spec.attention == "fused")
    method.to(device)
    if spec.channels_last:
        method.to(memory_format=torch.channels_last)
    method.train()
    return method, collate


def _time_collate(collate: Callable, cfg: Any, spec: Spec, batch: int, ctx: Context) -> tuple[list[Any], float]:
    """The collate on the CPU: one warmup call, then distinct batch seeds. Returns the batches, on
    the device, and the mean seconds per batch."""
    from vfm.engine.device import channels_last_batch, to_device

    n_batches = max(1, min(spec.steps, 2 if ctx.args.quick else 4))
    samples = make_samples(cfg, spec.method, batch, seed=0)
    collate([(*s[:-1], 10_000) for s in samples])
    batches, data_s = [], []
    for i in range(n_batches):
        t0 = time.perf_counter()
        b = collate([(*s[:-1], i) for s in samples])
        data_s.append(time.perf_counter() - t0)
        batches.append(b)
    batches = [to_device(b, ctx.device) for b in batches]
    if spec.channels_last:
        batches = [channels_last_batch(b) for b in batches]  # as the trainer does
    return batches, sum(data_s) / len(data_s)


def _step_flops(method: torch.nn.Module, batch: Any, sv: dict[str, list[float]], precision: str,
                device: torch.device) -> int:
    """FLOPs of one real forward + `loss.backward()` of the eager method, on the whole batch."""

    def fwd_bwd() -> None:
        with autocast(device, precision):
            loss = method(batch, 0, {k: v[0] for k, v in sv.items()})["loss"]
        loss.backward()

    return count_step_flops(fwd_bwd)


def _train_step(method: torch.nn.Module, optimizer: torch.optim.Optimizer, optim: Any, batches: list[Any],
                sv: dict[str, list[float]], spec: Spec, device: torch.device) -> Callable[[int], None]:
    """Step i of the optimisation as `Trainer.fit` runs it (compiled when the spec says so)."""
    from vfm.engine.optim import clip_gradients, set_optimizer_values

    trainable = [p for g in optimizer.param_groups for p in g["params"]]
    model: torch.nn.Module = method
    if spec.compile:
        with contextlib.suppress(Exception):
            torch._dynamo.reset()
        torch._dynamo.utils.counters.clear()
        model = torch.compile(method)

    def step(i: int) -> None:
        sched = {k: v[i] for k, v in sv.items()}
        set_optimizer_values(optimizer, sched["lr"], sched["wd"])
        with autocast(device, spec.precision):
            res = model(batches[i % len(batches)], i, sched)
        loss = res["loss"]
        float(loss.detach())  # the trainer's one read-back per step (non-finite check)
        loss.backward()
        clip_gradients(trainable, optim.clip_grad, optim.clip_mode)
        method.before_optimizer_step(i, sched)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        method.on_step_end(i, sched)

    return step


def _time_steps(step: Callable[[int], None], spec: Spec, device: torch.device) -> tuple[list[float], float]:
    """(seconds of each warmup step, mean seconds per timed step after them)."""
    warm_s = []
    for i in range(spec.warmup):
        sync(device)
        t0 = time.perf_counter()
        step(i)
        sync(device)
        warm_s.append(time.perf_counter() - t0)
    sync(device)
    t0 = time.perf_counter()
    for i in range(spec.warmup, spec.warmup + spec.steps):
        step(i)
    sync(device)
    return warm_s, (time.perf_counter() - t0) / spec.steps


def _summarise(ctx: Context, spec: Spec, out: dict[str, Any], batch: int, warm_s: list[float], compute_s: float,
               mem: PeakMemory) -> dict[str, Any]:
    """Rates, the data share, compile cost, memory and MFU from the raw timings in `out`."""
    out["compute_s"] = compute_s
    out["first_steps_extra_s"] = max(0.0, sum(warm_s) - compute_s * len(warm_s))  # compile / first-call cost
    if spec.compile:
        out["compile_s"] = out["first_steps_extra_s"]
        with contextlib.suppress(Exception):
            out["compiled_graphs"] = int(torch._dynamo.utils.counters["stats"]["unique_graphs"])
    out["img_s"] = batch / compute_s
    if out["data_s"] is not None:
        out["img_s_with_data"] = batch / (out["data_s"] + compute_s)
        out["data_share"] = out["data_s"] / (out["data_s"] + compute_s)
    out["peak_mem_mib"], out["mem_kind"] = mem.mib, mem.kind
    if spec.count_flops:
        out.update(mfu(ctx, out["flops_per_img"], out["img_s"], spec.precision))
    return out
