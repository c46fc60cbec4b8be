"""Benchmarks behind the README's performance claims (`make bench`).

Section `mae` (the default): MAE's encoder runs on the visible patches only, so its cost must fall
with the mask ratio. For each ratio it reports the visible tokens, the encoder's FLOPs per image
(counted with torch.utils.flop_counter, forward only), the measured time of one encoder
forward + backward and of a whole MAE optimisation step (encoder + decoder + loss + AdamW), bf16
autocast, on synthetic images; for the Fashion-MNIST recipe (ViT-Ti/6, 4 px patches, batch 256)
and for ViT-B/16 at 224 px (the paper's setting, a small batch on a CPU).

    python scripts/bench.py                 # all sections
    python scripts/bench.py mae --repeats 5
"""

from __future__ import annotations

import argparse

import torch
from hydra import compose, initialize_config_dir
from microbench import timed  # scripts/ is on sys.path when run as a script
from torch.utils.flop_counter import FlopCounterMode

from vfm.config import CONF_DIR, register_resolvers
from vfm.data.masking import random_masks
from vfm.pretrain import build_method


def mae_rows(name: str, overrides: list[str], batch: int, repeats: int) -> list[str]:
    register_resolvers()
    with initialize_config_dir(CONF_DIR, version_base="1.3"):
        cfg = compose("pretrain", overrides=["method=mae", *overrides])
    mae = build_method(cfg)
    size, chans, p = cfg.dataset.img_size, cfg.dataset.in_chans, mae.patch_size
    x = torch.randn(batch, chans, size, size)
    grid = size // p
    opt = torch.optim.AdamW([q for q in mae.parameters() if q.requires_grad], foreach=True)
    rows, base = [], None
    for ratio in (0.0, 0.5, 0.75, 0.9):
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

        enc_ms = 1000 * timed(enc, repeats)
        mae.zero_grad(set_to_none=True)
        ips = batch / timed(step, repeats)
        base = base or enc_ms
        rows.append(f"| {name} | {ratio:.2f} | {int(ids_keep.shape[1])} / {grid * grid} | {gflops:.3f} | "
                    f"{enc_ms:.0f} ({enc_ms / base:.2f}x) | {ips:.0f} |")
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("sections", nargs="*", choices=[[], "mae"], help="sections to run (default: all)")
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    args.sections = args.sections or ["mae"]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, bf16 autocast, synthetic images\n")
    if "mae" in args.sections:
        print("| MAE setting | mask ratio | visible patches | encoder GFLOPs / image (fwd) | "
              "encoder fwd+bwd ms / batch | full step img/s |\n|---|---|---|---|---|---|")
        for row in mae_rows("ViT-Ti/6, 28 px, patch 4, batch 256 (Fashion-MNIST recipe)",
                            ["dataset=fashion_mnist"], 256, args.repeats):
            print(row, flush=True)
        for row in mae_rows("ViT-B/16, 224 px, batch 16", ["backbone=vit_base", "dataset=synthetic", "dataset.img_size=224",
                                                           "dataset.in_chans=3", "dataset.mean=[0.5,0.5,0.5]",
                                                           "dataset.std=[0.25,0.25,0.25]"], 16, max(2, args.repeats // 2)):
            print(row, flush=True)


if __name__ == "__main__":
    main()
