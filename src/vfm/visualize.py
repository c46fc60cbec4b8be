"""`visualize`: DINO's last-layer attention maps and DINOv2-style patch PCA of a ViT checkpoint.

    visualize checkpoint=outputs/pretrain/default/checkpoints/last.pt
    visualize checkpoint=outputs/pretrain/default/encoder.safetensors threshold=0.6
    visualize checkpoint=random backbone=vit_tiny

Takes the first `num_images` images of `split`, writes `attention.png` (per image: the input, then
each head's [CLS] attention over the patches; Caron et al. 2021, facebookresearch/dino
`visualize_attention.py`) and `pca.png` (inputs over their patch-feature PCA as RGB; Oquab et al.
2024) into the run directory. `run(cfg)` returns the written paths and is what tests call.
"""

from __future__ import annotations

import logging
from pathlib import Path

import hydra
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig
from torch.utils.data import Dataset

from vfm.cli import run_or_exit
from vfm.config import CONF_DIR, ConfigError, register_resolvers, validate_evaluate
from vfm.data.datasets import DataSplits, TensorImageDataset
from vfm.engine.trainer import select_device
from vfm.evaluate import load_encoder
from vfm.viz import as_vision_transformer, render_figures, save_png

log = logging.getLogger("vfm.visualize")
register_resolvers()

SPLITS = ("train", "val", "test")


def validate_visualize(cfg: DictConfig) -> None:
    """Config checks that need no data and no model: missing keys, groups, this command's keys."""
    validate_evaluate(cfg)  # missing values (checkpoint=???) and the backbone/dataset/trainer nodes
    if not isinstance(cfg.num_images, int) or isinstance(cfg.num_images, bool) or cfg.num_images < 1:
        raise ConfigError(f"num_images={cfg.num_images!r} must be an integer >= 1, e.g. num_images=8")
    if cfg.split not in SPLITS:
        raise ConfigError(f"split={cfg.split!r} must be one of {', '.join(SPLITS)}")
    for key, lo_open in (("threshold", True), ("foreground_threshold", False)):
        v = cfg.get(key)
        if v is None:
            continue
        ok = isinstance(v, (int, float)) and not isinstance(v, bool) and (0 < v <= 1 if lo_open else 0 <= v <= 1)
        if not ok:
            interval = "(0, 1]" if lo_open else "[0, 1]"
            raise ConfigError(f"{key}={v!r} must be null or a fraction in {interval}, e.g. {key}=0.6")
    scale = cfg.get("scale")
    if scale is not None and (not isinstance(scale, int) or isinstance(scale, bool) or scale < 1):
        raise ConfigError(f"scale={scale!r} must be null (automatic) or an integer >= 1, e.g. scale=4")


def first_images(splits: DataSplits, split: str, n: int) -> torch.Tensor:
    """The first `n` images of a split as uint8 [n, C, H, W], centre-cropped to the dataset's img_size."""
    ds: Dataset | None = getattr(splits, split)
    if ds is None:
        avail = [s for s in SPLITS if getattr(splits, s) is not None]
        raise ConfigError(f"the dataset has no {split!r} split; use split={avail[0] if avail else 'train'}")
    count = min(n, len(ds))  # type: ignore[arg-type]
    if count < n:
        log.warning("split %s has only %d images; showing %d", split, count, count)
    if isinstance(ds, TensorImageDataset):
        images = ds.images[:count]  # in-memory datasets: one slice, no per-item indexing
    else:
        images = torch.stack([ds[i][0] for i in range(count)])
    size = splits.img_size
    h, w = images.shape[-2:]
    if h > size or w > size:  # folder datasets are stored at load_size; the model sees img_size crops
        top, left = (h - size) // 2, (w - size) // 2
        images = images[..., top : top + size, left : left + size]
    return images


def run(cfg: DictConfig) -> dict[str, str]:
    validate_visualize(cfg)
    run_dir = Path(cfg.paths.output_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    device = select_device(cfg.trainer.device)
    encoder, _ = load_encoder(str(cfg.checkpoint), cfg.backbone, seed=cfg.trainer.seed)
    try:  # before any data is read: a ResNet has no patch tokens to show
        vit = as_vision_transformer(encoder)
    except ValueError as e:
        raise ConfigError(f"checkpoint={cfg.checkpoint}: {e}") from None
    splits = instantiate(cfg.dataset)
    images = first_images(splits, str(cfg.split), int(cfg.num_images))
    in_chans = vit.patch_embed.proj.in_channels
    if in_chans != images.shape[1]:
        raise ConfigError(
            f"checkpoint={cfg.checkpoint} takes {in_chans}-channel images but the dataset's have "
            f"{images.shape[1]}; pick a dataset like the one it was trained on"
        )
    figures = render_figures(
        encoder.to(device), images, mean=splits.mean, std=splits.std, threshold=cfg.threshold,
        foreground_threshold=cfg.foreground_threshold, scale=cfg.scale,
    )
    paths = {name: str(save_png(grid, run_dir / f"{name}.png")) for name, grid in figures.items()}
    print("\n".join(f"{name:10s} {p}" for name, p in paths.items()), flush=True)
    return paths


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="visualize")
def main(cfg: DictConfig) -> None:
    run_or_exit(run, cfg)


if __name__ == "__main__":
    main()
