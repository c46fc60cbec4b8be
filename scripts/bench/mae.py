"""`mae`: MAE's encoder cost vs the mask ratio (encoder FLOPs forward only, fwd+bwd time, full step;
the Fashion-MNIST recipe and ViT-B/16 at 224 px; CPU only)."""

from __future__ import annotations

from typing import Any

import torch

from .common import Context, table, timed_device
from .configs import compose_cfg, quick_overrides

RATIOS = (0.0, 0.5, 0.75, 0.9)


def section_mae(ctx: Context) -> dict[str, Any]:
    """MAE's encoder cost vs the mask ratio (CPU, bf16 autocast); rows are printed as they come."""
    repeats = 1 if ctx.args.quick else ctx.args.repeats
    md = table("### MAE encoder cost and the mask ratio (CPU, bf16 autocast)",
               ["MAE setting", "mask ratio", "visible patches", "encoder GFLOPs / image (fwd)",
                "encoder fwd+bwd ms / batch", "full step img/s"])
    print("\n".join(md), flush=True)
    settings = [("ViT-Ti/6, 28 px, patch 4, batch 256 (Fashion-MNIST recipe)", ["dataset=fashion_mnist"], 256, repeats)]
    if ctx.args.quick:
        settings = [("tiny ViT, 28 px, patch 7, batch 16 (--quick)", ["dataset=fashion_mnist", *quick_overrides("mae")],
                     16, repeats)]
    else:
        settings.append(("ViT-B/16, 224 px, batch 16", ["backbone=vit_base", "dataset=synthetic", "dataset.img_size=224",
                                                        "dataset.in_chans=3", "dataset.mean=[0.5,0.5,0.5]",
                                                        "dataset.std=[0.25,0.25,0.25]"], 16, max(2, repeats // 2)))
    rows = []
    for name, ov, batch, reps in settings:
        for row in mae_rows(name, ov, batch, reps):
            print(row, flush=True)
            rows.append(row)
    return {"rows": rows, "markdown": "\n".join(md + rows), "streamed": True}


def mae_rows(name: str, overrides: list[str], batch: int, repeats: int) -> list[str]:
    """One table row per mask ratio: visible patches, encoder forward GFLOPs per image, encoder
    forward+backward time and full-step images/s (each timed after 2 untimed calls)."""
    from torch.utils.flop_counter import FlopCounterMode

    from vfm.data.masking import random_masks
    from vfm.pretrain import build_method

    cfg = compose_cfg(["method=mae", *overrides])
    mae = build_method(cfg)
    size, chans, p = cfg.dataset.img_size, cfg.dataset.in_chans, mae.patch_size
    x = torch.randn(batch, chans, size, size)
    grid = size // p
    opt = torch.optim.AdamW([q for q in mae.parameters() if q.requires_grad], foreach=True)
    cpu = torch.device("cpu")
    rows, base = [], None
    for ratio in RATIOS:
        mask = random_masks(batch, grid, ratio=ratio, generator=torch.Generator().manual_seed(0))
        ids_keep, _ = mae.random_masking(mask)
        with FlopCounterMode(display=False) as fc:
            mae.backbone.forward_visible(x[:1], ids_keep[:1])
        gflops = fc.get_total_flops() / 1e9

        def enc(ids_keep: torch.Tensor = ids_keep) -> None:
            with torch.autocast("cpu", dtype=torch.bfloat16):
                out = mae.backbone.forward_visible(x, ids_keep)["tokens"]
            out.float().mean().backward()

        def step(mask: torch.Tensor = mask) -> None:
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss = mae.training_step({"crops": [x], "masks": [mask]}, 0, {})["loss"]
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        enc_ms = 1000 * timed_device(enc, repeats, cpu, warmup=2)
        mae.zero_grad(set_to_none=True)
        ips = batch / timed_device(step, repeats, cpu, warmup=2)
        base = base or enc_ms
        rows.append(f"| {name} | {ratio:.2f} | {int(ids_keep.shape[1])} / {grid * grid} | {gflops:.3f} | "
                    f"{enc_ms:.0f} ({enc_ms / base:.2f}x) | {ips:.0f} |")
    return rows
