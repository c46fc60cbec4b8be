"""CPU micro-benchmarks behind the README's throughput claims (`python scripts/microbench.py`).

Prints a Markdown table: bf16 vs fp32 matrix-product rate, one DINO optimisation step of the default
recipe (batch 128, 2 x 28 px + 4 x 14 px crops) with plain-op vs fused attention and with 6 vs 12
blocks, and the batched multi-crop augmentation. Uses synthetic images; nothing is written.

`--changes` measures instead the before/after of three engine changes the README reports:
the MAE decoder's attention (fused, as timm builds it, vs following backbone.attn_impl; MAE recipe
step, the two settings interleaved, median of 4 rounds), per-parameter gradient clipping (one
coefficient per parameter in its own kernels vs `clip_gradients`' batched coefficients, on a
ViT-B-sized list of gradients) and activation checkpointing (resident-memory growth of one ViT-B/16
forward + backward of 32 images at 224 px, bf16, each setting in a fresh process).
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

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


def changes() -> list[str]:
    before, after = mae_decoder_attention()
    rows = [f"| MAE recipe step, decoder attention fused -> as backbone.attn_impl | {before:.0f} -> {after:.0f} img/s "
            f"({after / before:.2f}x) |"]
    before, after = clipping_ms()
    rows.append(f"| per-parameter clipping, ViT-B-sized gradients: per-parameter -> batched coefficients | "
                f"{before:.1f} -> {after:.1f} ms |")
    off, on = grad_ckpt_growth_mib(False), grad_ckpt_growth_mib(True)
    rows.append(f"| ViT-B/16 fwd+bwd, 32 x 224 px: memory growth without -> with grad_checkpointing | "
                f"{off:.0f} -> {on:.0f} MiB ({off / on:.1f}x less) |")
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--repeats", type=int, default=6)
    ap.add_argument("--changes", action="store_true", help="the before/after of three engine changes instead")
    args = ap.parse_args()
    if args.changes:
        print(f"torch {torch.__version__}, {torch.get_num_threads()} threads\n\n| measurement | value |\n|---|---|")
        print("\n".join(changes()))
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
