"""FSDP vs DDP on CPU processes: per-process memory of the training state, and step time.

    torchrun --standalone --nproc_per_node=2 scripts/bench_fsdp.py [--backbone vit_small|vit_base] [--steps 3]
        [--batch 8] [--precision bf16|fp32] [--depth N] [--json PATH] [HYDRA_OVERRIDE ...]

For each strategy (ddp, fsdp) every process builds the DINO method from the pretrain config
(`method=dino`, synthetic 64 px images, 32 px local crops by default, so a step is quick on two
cores), wraps it as `Trainer.fit` does (DDP: `DistributedDataParallel(method)`; FSDP:
`vfm.engine.fsdp.shard(copy.deepcopy(method), cpu)`), builds the optimizer with
`instantiate(cfg.optim).build(net.param_groups(), "cpu")` and runs one warm-up step plus `--steps`
timed steps (forward, backward, clipping, AdamW, EMA update) on multi-crop views of random uint8
images (`--batch` per process, the config's `MultiCropAugmentation`).

Then it counts, per process, the bytes of the tensors the training state consists of: parameters
(student and EMA teacher), gradients and optimizer state (every tensor in `optimizer.state`);
for sharded `DTensor`s only the local shard (`to_local()`). Activations, DDP's gradient buckets and
FSDP's all-gather buffers are transient or internal and not counted. Rank 0 prints a Markdown
table with the largest value over the processes (the one that must fit in a device's memory) and
the median step time of the slowest process, plus the ratio ddp/fsdp of the total; `--json PATH`
also writes every process's numbers.

`--depth N` shortens the backbone (a smoke-test size); further positional arguments are Hydra
overrides of the pretrain config (e.g. `method.out_dim=1024`).
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import os
import statistics
import sys
import time
import warnings
from collections.abc import Sequence
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from omegaconf import DictConfig
from torch import nn

from vfm.config import CONF_DIR, register_resolvers
from vfm.engine import fsdp
from vfm.engine.device import PRECISIONS
from vfm.engine.optim import clip_gradients, set_optimizer_values
from vfm.pretrain import build_method

MIB = 2**20
STRATEGIES = ("ddp", "fsdp")  # the two this script compares, each as the trainer wraps the method
# The values after DINO's first epoch: the head's last layer trains (so it has gradients and AdamW
# state, as for most of a run) and the teacher follows the student by EMA
SCHED = {"teacher_temp": 0.04, "teacher_momentum": 0.996, "freeze_last_layer": 0.0, "lr": 1e-4, "wd": 0.04}


def compose_config(backbone: str = "vit_small", *, img_size: int = 64, local_crop_size: int = 32,
                   precision: str = "bf16", depth: int | None = None, overrides: Sequence[str] = ()) -> DictConfig:
    """The pretrain config of the benchmark: DINO on small synthetic images."""
    register_resolvers()
    args = ["method=dino", f"backbone={backbone}", "dataset=synthetic", "~recipe", f"dataset.img_size={img_size}",
            f"method.augment.local_crop_size={local_crop_size}", f"trainer.precision={precision}",
            "trainer.device=cpu"]
    if depth is not None:
        args.append(f"+backbone.model_kwargs.depth={depth}")
    with initialize_config_dir(CONF_DIR, version_base="1.3"):
        return compose("pretrain", overrides=[*args, *overrides])


def local_bytes(t: torch.Tensor) -> int:
    """Bytes this process holds of `t`: the local shard of a DTensor, else the whole tensor."""
    from torch.distributed.tensor import DTensor

    if isinstance(t, DTensor):
        t = t.to_local()
    return t.numel() * t.element_size()


def state_bytes(net: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, int]:
    """Bytes of parameters, gradients and optimizer state held by this process."""
    params = list(net.parameters())
    out = {
        "params": sum(local_bytes(p) for p in params),
        "grads": sum(local_bytes(p.grad) for p in params if p.grad is not None),
        "optim": sum(local_bytes(v) for s in optimizer.state.values() for v in s.values() if torch.is_tensor(v)),
    }
    out["total"] = out["params"] + out["grads"] + out["optim"]
    return out


def wrap(method: nn.Module, strategy: str) -> tuple[nn.Module, nn.Module]:
    """(module to call, module that owns the parameters and the method's hooks), as `Trainer.fit`."""
    if strategy == "ddp":
        with warnings.catch_warnings():
            # the trainer's own argument; torch 2.14 deprecates its name, not what it does here
            warnings.filterwarnings("ignore", message=".*broadcast_buffers", category=FutureWarning)
            return nn.parallel.DistributedDataParallel(method, broadcast_buffers=False), method
    if strategy == "fsdp":
        net = fsdp.shard(copy.deepcopy(method), torch.device("cpu"))
        return net, net
    raise ValueError(f"unknown strategy {strategy!r}; one of {STRATEGIES}")


def synthetic_crops(cfg: DictConfig, batch: int, seed: int) -> list[torch.Tensor]:
    """The config's multi-crop views of `batch` random uint8 images."""
    generator = torch.Generator().manual_seed(seed)
    size, chans = int(cfg.dataset.img_size), int(cfg.dataset.in_chans)
    images = torch.randint(0, 256, (batch, chans, size, size), dtype=torch.uint8, generator=generator)
    return instantiate(cfg.method.augment)(images, generator)


def run_strategy(cfg: DictConfig, strategy: str, *, steps: int, warmup: int = 1, batch: int = 8) -> dict[str, Any]:
    """Train `warmup + steps` steps under `strategy`; this process's state bytes and step times."""
    rank = dist.get_rank()
    method = build_method(cfg)  # seeded by the config: the same initial weights on every process
    model, net = wrap(method, strategy)
    del method  # FSDP trains a sharded copy; the trainer keeps the original on the host, not counted here
    spec = instantiate(cfg.optim)
    optimizer = spec.build(net.param_groups(), "cpu")
    trainable = [p for g in optimizer.param_groups for p in g["params"]]
    dtype = PRECISIONS[cfg.trainer.precision]
    crops = synthetic_crops(cfg, batch, seed=rank)  # each process its own images, as from the sampler
    net.train()
    times, sizes = [], {}
    for i in range(warmup + steps):
        set_optimizer_values(optimizer, SCHED["lr"], SCHED["wd"])
        dist.barrier()  # the processes start each step together, so a step's time is the step's alone
        t0 = time.perf_counter()
        with torch.autocast("cpu", dtype=dtype) if dtype is not None else nullcontext():
            loss = model({"crops": crops}, i, SCHED)["loss"]
        loss.backward()
        clip_gradients(trainable, spec.clip_grad, spec.clip_mode)
        net.before_optimizer_step(i, SCHED)
        optimizer.step()
        if i == warmup + steps - 1:
            # the step's peak of persistent state: gradients still held, optimizer state created
            t_count = time.perf_counter()
            sizes = state_bytes(net, optimizer)
            t0 += time.perf_counter() - t_count  # counting is not part of the step
        optimizer.zero_grad(set_to_none=True)
        net.on_step_end(i, SCHED)
        if i >= warmup:
            times.append(time.perf_counter() - t0)
        if not torch.isfinite(loss.detach()):
            raise FloatingPointError(f"{strategy}: non-finite loss at step {i}")
    del model, net, optimizer, trainable
    gc.collect()
    return {**sizes, "ms_per_step": 1000 * statistics.median(times), "loss": float(loss.detach())}


def summarize(strategy: str, per_rank: list[dict[str, Any]]) -> dict[str, Any]:
    """One table row: the largest bytes and step time over the processes, and every process's numbers."""
    row: dict[str, Any] = {"strategy": strategy}
    for key in ("params", "grads", "optim", "total"):
        row[f"{key}_bytes"] = max(r[key] for r in per_rank)
    row["ms_per_step"] = max(r["ms_per_step"] for r in per_rank)
    row["per_rank"] = per_rank
    return row


def format_table(report: dict[str, Any]) -> str:
    """The Markdown table rank 0 prints."""
    lines = [
        f"DINO, {report['backbone']}, {report['world_size']} CPU processes (gloo), {report['batch']} images per "
        f"process, {report['precision']}; the largest value over the processes",
        "",
        "| strategy | params MiB | grads MiB | optimizer state MiB | total MiB per process | ms/step |",
        "|---|---|---|---|---|---|",
    ]
    for r in report["rows"]:
        lines.append(f"| {r['strategy']} | {r['params_bytes'] / MIB:.1f} | {r['grads_bytes'] / MIB:.1f} | "
                     f"{r['optim_bytes'] / MIB:.1f} | {r['total_bytes'] / MIB:.1f} | {r['ms_per_step']:.0f} |")
    lines += ["", f"total per process, ddp / fsdp: {report['ratio_total_ddp_over_fsdp']:.2f}x"]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> dict[str, Any] | None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backbone", default="vit_small", help="a conf/backbone config (vit_tiny, vit_small, vit_base)")
    ap.add_argument("--steps", type=int, default=3, help="timed steps per strategy (after one warm-up step)")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--batch", type=int, default=8, help="images per process")
    ap.add_argument("--img-size", type=int, default=64)
    ap.add_argument("--local-crop-size", type=int, default=32)
    ap.add_argument("--precision", choices=["bf16", "fp32"], default="bf16")
    ap.add_argument("--depth", type=int, default=None, help="backbone depth (blocks); default: the backbone's")
    ap.add_argument("--json", type=Path, default=None, help="also write the numbers here (rank 0)")
    ap.add_argument("overrides", nargs="*", help="Hydra overrides of the pretrain config")
    args = ap.parse_args(argv)
    if args.steps < 1 or args.warmup < 0:
        ap.error("--steps must be >= 1 and --warmup >= 0")
    if "RANK" not in os.environ:
        ap.error("launch with torchrun --standalone --nproc_per_node=2 scripts/bench_fsdp.py ...")
    dist.init_process_group("gloo")
    try:
        cfg = compose_config(args.backbone, img_size=args.img_size, local_crop_size=args.local_crop_size,
                             precision=args.precision, depth=args.depth, overrides=args.overrides)
        rows = []
        for strategy in STRATEGIES:
            mine = run_strategy(cfg, strategy, steps=args.steps, warmup=args.warmup, batch=args.batch)
            gathered: list[Any] = [None] * dist.get_world_size()
            dist.all_gather_object(gathered, mine)
            rows.append(summarize(strategy, gathered))
        by = {r["strategy"]: r for r in rows}
        report = {
            "backbone": args.backbone, "depth": args.depth, "world_size": dist.get_world_size(), "batch": args.batch,
            "img_size": args.img_size, "local_crop_size": args.local_crop_size, "precision": args.precision,
            "steps": args.steps, "overrides": list(args.overrides), "torch": torch.__version__,
            "threads": torch.get_num_threads(), "rows": rows,
            "ratio_total_ddp_over_fsdp": by["ddp"]["total_bytes"] / by["fsdp"]["total_bytes"],
        }
        if dist.get_rank() == 0:
            print(format_table(report), flush=True)
            if args.json is not None:
                args.json.parent.mkdir(parents=True, exist_ok=True)
                args.json.write_text(json.dumps(report, indent=2))
        return report
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
    # Skip the interpreter's teardown: with torch 2.14 a gloo worker thread (pt_gloo_runloop) may
    # still be destroying the last collective's work object when Python finalizes, and the decref
    # of its tensors then aborts the process ("terminate called without an active exception", 1 run
    # in 5-10 here, after all output was written) although destroy_process_group() was called.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
