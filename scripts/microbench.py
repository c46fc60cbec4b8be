"""CPU micro-benchmarks behind the README's throughput claims (`python scripts/microbench.py`).

Prints a Markdown table: bf16 vs fp32 matrix-product rate, one DINO optimisation step of the default
recipe (batch 128, 2 x 28 px + 4 x 14 px crops) with plain-op vs fused attention and with 6 vs 12
blocks, and the batched multi-crop augmentation. Uses synthetic images; nothing is written.

`--changes` measures instead the before/after of engine changes the README reports:
the MAE decoder's attention (fused, as timm builds it, vs following backbone.attn_impl; MAE recipe
step, the two settings interleaved, median of 4 rounds), per-parameter gradient clipping (one
coefficient per parameter in its own kernels vs `clip_gradients`' batched coefficients, on a
ViT-B-sized list of gradients) and activation checkpointing (resident-memory growth of one ViT-B/16
forward + backward of 32 images at 224 px, bf16, each setting in a fresh process), and two more:

* the training DataLoader (`build_train_loader`, 2 workers, the default recipe's multi-crop
  augmentation on random uint8 images, 4 epochs of 8 batches of 64, `sampler.set_epoch` each
  epoch) feeding a consumer that sleeps 10 ms per batch, standing for a GPU step the training
  process waits on: seconds per epoch with `persistent_workers` false -> true and with
  `prefetch_factor` 2 -> 4 (the settings interleaved, median of 3 rounds);
* FSDP vs DDP: `scripts/bench_fsdp.py` under `torch.distributed.run --nproc_per_node=2` (gloo,
  OMP_NUM_THREADS=1), DINO with a ViT-S/16 on 64 px images: the bytes of parameters, gradients
  and AdamW state per process, and the step time, read from its JSON.

`--changes --only loader,fsdp` runs only the named sections (of mae, clipping, ckpt, loader,
fsdp); `--fsdp-backbone vit_base` and `--fsdp-steps N` size the FSDP run.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

from vfm.config import CONF_DIR, register_resolvers
from vfm.pretrain import build_method


def timed(fn: Callable[[], object], repeats: int, warmup: int = 2) -> float:
    """Mean seconds per call after `warmup` calls."""
    for _ in range(warmup):
        fn()
    t0 = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - t0) / repeats


def matmul_rate(dtype: torch.dtype, n: int = 2048) -> float:
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    return 2 * n**3 / timed(lambda: a @ b, 10) / 1e9


def dino_step_rate(overrides: list[str], repeats: int) -> tuple[float, float]:
    """(images per second of a full DINO step, ms to augment one batch) for the default recipe."""
    register_resolvers()
    with initialize_config_dir(CONF_DIR, version_base="1.3"):
        cfg = compose("pretrain", overrides=overrides)
    method = build_method(cfg)
    augment = instantiate(cfg.method.augment)
    batch = cfg.trainer.batch_size
    images = torch.randint(0, 256, (batch, cfg.dataset.in_chans, cfg.dataset.img_size, cfg.dataset.img_size),
                           dtype=torch.uint8)
    generator = torch.Generator().manual_seed(0)
    aug_s = timed(lambda: augment(images, generator), repeats)
    crops = augment(images, generator)
    optimizer = torch.optim.AdamW([p for p in method.parameters() if p.requires_grad], foreach=True)
    sched = {"teacher_temp": 0.04, "teacher_momentum": 0.98, "freeze_last_layer": 0.0}

    def step() -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = method.training_step({"crops": crops}, 0, sched)["loss"]
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        method.on_step_end(0, sched)

    return batch / timed(step, repeats), 1000 * aug_s


def mae_decoder_attention(rounds: int = 4, steps: int = 6) -> tuple[float, float]:
    """MAE recipe img/s with the decoder's attention fused (before) and following the backbone (after)."""
    import statistics

    from vfm.data.masking import random_masks

    register_resolvers()
    with initialize_config_dir(CONF_DIR, version_base="1.3"):
        cfg = compose("pretrain", overrides=["method=mae"])
    mae = build_method(cfg)
    batch = cfg.trainer.batch_size
    x = torch.randn(batch, cfg.dataset.in_chans, cfg.dataset.img_size, cfg.dataset.img_size)
    mask = random_masks(batch, cfg.dataset.img_size // mae.patch_size, ratio=0.75,
                        generator=torch.Generator().manual_seed(0))
    opt = torch.optim.AdamW([q for q in mae.parameters() if q.requires_grad], foreach=True)

    def step() -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = mae({"crops": [x], "masks": [mask]}, 0, {})["loss"]
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    rates: dict[str, list[float]] = {"fused": [], "auto": []}
    for _ in range(rounds):
        for impl in rates:
            mae.decoder.attn_impl, mae.decoder._attn_device = impl, None
            rates[impl].append(batch / timed(step, steps, warmup=1))
    return statistics.median(rates["fused"]), statistics.median(rates["auto"])


def clipping_ms(repeats: int = 20) -> tuple[float, float]:
    """ms per per-parameter clip of ViT-B-sized gradients: a coefficient per parameter (before) vs batched."""
    from vfm.engine.optim import clip_gradients

    params = [torch.zeros(s, requires_grad=True) for s in [(768, 768)] * 48 + [(3072, 768)] * 24 + [(768,)] * 100]
    for q in params:
        q.grad = torch.randn_like(q)

    def per_parameter() -> None:
        grads = [q.grad for q in params]
        norms = torch._foreach_norm(grads)
        torch.linalg.vector_norm(torch.stack(norms))
        torch._foreach_mul_(grads, [(3.0 / (n + 1e-6)).clamp(max=1.0) for n in norms])

    return (1000 * timed(per_parameter, repeats), 1000 * timed(lambda: clip_gradients(params, 3.0, "per_param"), repeats))


def grad_ckpt_growth_mib(checkpointing: bool) -> float:
    """Resident-memory growth (MiB) of one ViT-B/16 forward + backward, 32 x 224 px, in a fresh process."""
    import subprocess
    import sys

    code = f"""
import resource, torch
from vfm.backbones import Backbone
b = Backbone("vit_base_patch16_224", img_size=224, patch_size=16, grad_checkpointing={checkpointing})
x = torch.randn(32, 3, 224, 224)
base = int(open("/proc/self/statm").read().split()[1]) * 4096 / 2**20
with torch.autocast("cpu", dtype=torch.bfloat16):
    out = b.forward_tokens(x)["patch"]
out.float().square().mean().backward()
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - base)
"""
    return float(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout)


def loader_seconds_per_epoch(*, persistent_workers: bool = True, prefetch_factor: int = 2, epochs: int = 4,
                             batches: int = 8, batch_size: int = 64, num_workers: int = 2, consume_ms: float = 10.0,
                             overrides: Sequence[str] = ()) -> list[float]:
    """Wall seconds of each epoch of a fresh training loader over random uint8 images, its batches
    augmented by the DINO recipe's multi-crop collate, the consumer sleeping `consume_ms` per batch.

    An epoch is timed from `sampler.set_epoch` to the end of its iteration, so it includes what
    the loader does between epochs: without persistent workers, forking the workers (and their
    copy of the dataset) again and shutting them down.
    """
    from vfm.data.collate import MultiCropCollate
    from vfm.data.datasets import TensorImageDataset
    from vfm.data.loader import build_train_loader

    register_resolvers()
    with initialize_config_dir(CONF_DIR, version_base="1.3"):
        cfg = compose("pretrain", overrides=list(overrides))
    size, chans = int(cfg.dataset.img_size), int(cfg.dataset.in_chans)
    generator = torch.Generator().manual_seed(0)
    n = batches * batch_size
    dataset = TensorImageDataset(torch.randint(0, 256, (n, chans, size, size), dtype=torch.uint8, generator=generator),
                                 torch.zeros(n, dtype=torch.int64))
    loader, sampler = build_train_loader(
        dataset, batch_size=batch_size, collate_fn=MultiCropCollate(instantiate(cfg.method.augment)),
        num_workers=num_workers, persistent_workers=persistent_workers, prefetch_factor=prefetch_factor,
    )
    seconds = []
    try:
        for epoch in range(epochs):
            t0 = time.perf_counter()
            sampler.set_epoch(epoch)
            for _ in loader:
                time.sleep(consume_ms / 1000)  # the training process waiting on the device
            seconds.append(time.perf_counter() - t0)
    finally:
        del loader  # persistent workers end with their loader
    return seconds


def compare_loaders(settings: Mapping[str, Mapping[str, Any]], rounds: int = 3, **kw: Any) -> dict[str, float]:
    """Median over `rounds` of the mean seconds per epoch of each named loader setting.

    The settings take turns within each round, so a slow spell of the (shared) machine falls on
    all of them rather than on one.
    """
    per_round: dict[str, list[float]] = {name: [] for name in settings}
    for _ in range(rounds):
        for name, setting in settings.items():
            per_round[name].append(statistics.mean(loader_seconds_per_epoch(**setting, **kw)))
    return {name: statistics.median(v) for name, v in per_round.items()}


def loader_rows(*, rounds: int = 3, epochs: int = 4, batches: int = 8, batch_size: int = 64, num_workers: int = 2,
                consume_ms: float = 10.0) -> list[str]:
    """The `--changes` rows of the training loader: persistent workers, then the prefetch depth
    (with persistent workers, the default)."""
    kw = dict(epochs=epochs, batches=batches, batch_size=batch_size, num_workers=num_workers, consume_ms=consume_ms)
    what = (f"{num_workers} workers, {epochs} epochs x {batches} batches of {batch_size} (default DINO recipe "
            f"augmentation), consumer sleeping {consume_ms:g} ms/batch")
    rows = []
    for field, before, after in [("persistent_workers", False, True), ("prefetch_factor", 2, 4)]:
        s = compare_loaders({"before": {field: before}, "after": {field: after}}, rounds, **kw)
        rows.append(f"| training DataLoader, {what}: {field} {before} -> {after} | {s['before']:.3f} -> "
                    f"{s['after']:.3f} s/epoch ({s['before'] / s['after']:.2f}x) |")
    return rows


def fsdp_vs_ddp(backbone: str = "vit_small", steps: int = 3, extra: Sequence[str] = (),
                timeout_s: float = 900.0) -> dict[str, Any]:
    """The JSON report of scripts/bench_fsdp.py run on 2 CPU processes in a subprocess."""
    script = Path(__file__).resolve().with_name("bench_fsdp.py")
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "fsdp.json"
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script),
               "--backbone", backbone, "--steps", str(steps), "--json", str(out), *extra]
        # one intra-op thread per process: 2 processes share the 2 cores of the reference box
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s,
                              env={**os.environ, "OMP_NUM_THREADS": "1"})
        if proc.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
        return json.loads(out.read_text())


def fsdp_rows(report: Mapping[str, Any]) -> list[str]:
    """The `--changes` rows of a bench_fsdp.py report: per-process state memory, then step time."""
    by = {r["strategy"]: r for r in report["rows"]}
    ddp, fsdp = by["ddp"], by["fsdp"]
    what = (f"DINO {report['backbone']}, {report['img_size']} px, {report['world_size']} CPU processes (gloo), "
            f"{report['batch']} images/process, {report['precision']}")
    mib = 2**20
    return [
        f"| {what}: params + grads + AdamW state per process, ddp -> fsdp | {ddp['total_bytes'] / mib:.0f} -> "
        f"{fsdp['total_bytes'] / mib:.0f} MiB ({report['ratio_total_ddp_over_fsdp']:.2f}x less) |",
        f"| {what}: step time, ddp -> fsdp | {ddp['ms_per_step']:.0f} -> {fsdp['ms_per_step']:.0f} ms "
        f"({fsdp['ms_per_step'] / ddp['ms_per_step']:.2f}x) |",
    ]


SECTIONS = ("mae", "clipping", "ckpt", "loader", "fsdp")


def changes(only: Sequence[str] = SECTIONS, fsdp_backbone: str = "vit_small", fsdp_steps: int = 3) -> list[str]:
    rows = []
    if "mae" in only:
        before, after = mae_decoder_attention()
        rows.append(f"| MAE recipe step, decoder attention fused -> as backbone.attn_impl | {before:.0f} -> "
                    f"{after:.0f} img/s ({after / before:.2f}x) |")
    if "clipping" in only:
        before, after = clipping_ms()
        rows.append(f"| per-parameter clipping, ViT-B-sized gradients: per-parameter -> batched coefficients | "
                    f"{before:.1f} -> {after:.1f} ms |")
    if "ckpt" in only:
        off, on = grad_ckpt_growth_mib(False), grad_ckpt_growth_mib(True)
        rows.append(f"| ViT-B/16 fwd+bwd, 32 x 224 px: memory growth without -> with grad_checkpointing | "
                    f"{off:.0f} -> {on:.0f} MiB ({off / on:.1f}x less) |")
    if "loader" in only:
        rows += loader_rows()
    if "fsdp" in only:
        rows += fsdp_rows(fsdp_vs_ddp(fsdp_backbone, fsdp_steps))
    return rows


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--repeats", type=int, default=6)
    ap.add_argument("--changes", action="store_true", help="the before/after of engine changes instead")
    ap.add_argument("--only", default=",".join(SECTIONS),
                    help=f"with --changes: comma-separated sections to run, of {','.join(SECTIONS)}")
    ap.add_argument("--fsdp-backbone", default="vit_small", help="with --changes: the backbone of the FSDP rows")
    ap.add_argument("--fsdp-steps", type=int, default=3, help="with --changes: timed steps per strategy")
    args = ap.parse_args(argv)
    if args.changes:
        only = [s.strip() for s in args.only.split(",") if s.strip()]
        if unknown := sorted(set(only) - set(SECTIONS)):
            ap.error(f"--only: unknown section(s) {unknown}; choose from {list(SECTIONS)}")
        print(f"torch {torch.__version__}, {torch.get_num_threads()} threads\n\n| measurement | value |\n|---|---|")
        print("\n".join(changes(only, args.fsdp_backbone, args.fsdp_steps)), flush=True)
        return
    rows = [f"| matmul 2048^3, fp32 | {matmul_rate(torch.float32):.0f} GFLOP/s |",
            f"| matmul 2048^3, bf16 | {matmul_rate(torch.bfloat16):.0f} GFLOP/s |"]
    for name, overrides in [
        ("DINO step, 6 blocks, plain-op attention (default)", []),
        ("DINO step, 6 blocks, fused SDPA attention", ["backbone.attn_impl=fused"]),
        ("DINO step, 12 blocks (backbone=vit_tiny), plain-op attention", ["backbone=vit_tiny"]),
    ]:
        ips, aug_ms = dino_step_rate(overrides, args.repeats)
        rows.append(f"| {name} | {ips:.0f} img/s |")
    rows.append(f"| multi-crop augmentation, batch 128 (2 x 28 + 4 x 14 px) | {aug_ms:.1f} ms |")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads\n\n| measurement | value |\n|---|---|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
