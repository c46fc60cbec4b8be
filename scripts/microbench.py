"""CPU micro-benchmarks behind the README's throughput claims (`python scripts/microbench.py`).

Prints a Markdown table: bf16 vs fp32 matrix-product rate, one DINO optimisation step of the default
recipe (batch 128, 2 x 28 px + 4 x 14 px crops) with plain-op vs fused attention and with 6 vs 12
blocks, and the batched multi-crop augmentation. Uses synthetic images; nothing is written.
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--repeats", type=int, default=6)
    args = ap.parse_args()
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
