"""The configurations the sections measure: `pretrain` overrides per method and size, batch sizes,
synthetic batches, and the collate and schedules each step gets, built as `pretrain` builds them."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from .common import DINO_FAMILY

NOMINAL_TRAIN_IMAGES = {"small": 54_000, "imagenet": 1_281_167}  # Fashion-MNIST train split, ImageNet-1k


def compose_cfg(overrides: list[str]) -> Any:
    from hydra import compose, initialize_config_dir

    from vfm.config import CONF_DIR, register_resolvers

    register_resolvers()
    with initialize_config_dir(CONF_DIR, version_base="1.3"):
        return compose("pretrain", overrides=overrides)


def with_args(args: argparse.Namespace, **changes: Any) -> argparse.Namespace:
    """A copy of the command line with some settings replaced (a section at another size)."""
    return argparse.Namespace(**{**vars(args), **changes})


def recipe_args(args: argparse.Namespace) -> argparse.Namespace:
    """The command line at the Fashion-MNIST recipe size, whatever --img and --backbone say."""
    return with_args(args, img=None, backbone=None)


def quick_overrides(method: str) -> list[str]:
    """Tiny sizes (a 2-block, 32-wide ViT with 7 px patches): seconds per method."""
    ov = ["backbone.patch_size=7", "++backbone.model_kwargs={depth: 2, embed_dim: 32, num_heads: 2}"]
    if method in DINO_FAMILY:
        ov += ["method.out_dim=64", "method.hidden_dim=64", "method.bottleneck_dim=32",
               "method.augment.local_crop_size=14", "method.augment.n_local=2"]
        if method != "dino":
            ov += ["method.patch_out_dim=64", "method.masking.min_num_patches=1"]
    elif method == "mae":
        ov += ["method.decoder_dim=32", "method.decoder_depth=1", "method.decoder_heads=2"]
    elif method in ("beit", "eva"):
        ov += ["method.masking.min_num_patches=1"]
    elif method == "clip":
        ov += ["method.embed_dim=32", "method.text_tower.width=32", "method.text_tower.layers=1",
               "method.text_tower.heads=2", "method.text_tower.context_length=32"]
    return ov


def is_imagenet_sized(args: argparse.Namespace) -> bool:
    return bool(args.img and args.img > 32)


def method_overrides(method: str, args: argparse.Namespace) -> list[str]:
    """Overrides of `pretrain` for one method: the Fashion-MNIST recipe (conf/recipe/<m>_fashion_mnist.yaml,
    picked up with the default dataset), or ImageNet-sized synthetic RGB images with --img > 32
    (no recipe: the method's paper defaults; DINO-family: 2 global + --n-local local crops)."""
    ov = [f"method={method}"]
    if is_imagenet_sized(args):
        ov += ["dataset=synthetic_captions" if method == "clip" else "dataset=synthetic", "~recipe"]
        ov += [f"dataset.img_size={args.img}", "dataset.in_chans=3", "dataset.mean=[0.485,0.456,0.406]",
               "dataset.std=[0.229,0.224,0.225]", "dataset.num_classes=1000"]
        if method in DINO_FAMILY:
            ov.append(f"method.augment.n_local={args.n_local}")
    else:
        if method == "clip":
            ov.append("dataset=fashion_mnist_captions")
        if args.img:
            ov.append(f"dataset.img_size={args.img}")
    if args.backbone:
        ov.append(f"backbone={args.backbone}")
    if args.quick:
        ov += quick_overrides(method)
    return ov


def default_batch(method: str, cfg: Any, args: argparse.Namespace, device: torch.device) -> int:
    if args.quick:
        return 16
    if not is_imagenet_sized(args):
        return int(cfg.trainer.batch_size)  # the recipe's
    if device.type == "cuda":
        return 64 if method in DINO_FAMILY else 256 if method == "mae" else 128
    return 4 if method in DINO_FAMILY else 16 if method == "mae" else 8


def parse_batch(spec: str | None) -> tuple[int | None, dict[str, int]]:
    """"64" -> all methods; "dino=64,mae=256" -> per method; "32,dino=8" -> both."""
    default, per = None, {}
    for part in filter(None, (spec or "").split(",")):
        if "=" in part:
            k, v = part.split("=", 1)
            per[k.strip()] = int(v)
        else:
            default = int(part)
    return default, per


def mim_artifacts(cfg: Any, method: str, root: Path, quick: bool) -> list[str]:
    """BEiT's tokenizer / EVA's teacher for this config's backbone (its patch size, image size and
    channels), random weights, as tests/conftest.py::mim_artifacts builds them."""
    from hydra.utils import instantiate

    from vfm.heads.tokenizer import Tokenizer

    torch.manual_seed(0)
    backbone = instantiate(cfg.backbone, drop_path_rate=0.0)
    tag = f"{backbone.name}-p{backbone.patch_size}-{cfg.dataset.img_size}-{cfg.dataset.in_chans}"
    if method == "beit":
        path = root / f"tokenizer-{tag}.pt"
        if not path.exists():
            codes = 16 if quick else 512 if cfg.dataset.img_size <= 32 else 8192
            Tokenizer(backbone, num_codes=codes, code_dim=8 if quick else 32, kmeans_init=False).save(path)
        return [f"method.tokenizer={path}"]
    if method in ("eva", "eva02"):
        path = root / f"teacher-{tag}.safetensors"
        if not path.exists():
            backbone.export(path)
        return [f"method.teacher={path}"]
    return []


def uint8_images(cfg: Any, batch: int, seed: int) -> torch.Tensor:
    """[batch, C, H, W] random uint8 images of the config's dataset size."""
    c, s = int(cfg.dataset.in_chans), int(cfg.dataset.img_size)
    return torch.randint(0, 256, (batch, c, s, s), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


def make_samples(cfg: Any, method: str, batch: int, seed: int) -> list[tuple[Any, ...]]:
    """What SeededDataset + SeededBatchSampler hand the collate: (image, label, seed), or
    (image, caption, label, seed) for image-text methods; synthetic uint8 images."""
    g = torch.Generator().manual_seed(1234)
    c, s = int(cfg.dataset.in_chans), int(cfg.dataset.img_size)
    images = torch.randint(0, 256, (batch, c, s, s), dtype=torch.uint8, generator=g)
    labels = torch.randint(0, int(cfg.dataset.get("num_classes") or 10), (batch,), generator=g).tolist()
    if method == "clip":
        from vfm.data.prompts import CAPTION_TEMPLATES as templates
        from vfm.data.prompts import FASHION_MNIST_CLASS_NAMES_NATURAL as names

        caps = [templates[i % len(templates)].format(names[lab % len(names)]) for i, lab in enumerate(labels)]
        return [(images[i], caps[i], labels[i], seed) for i in range(batch)]
    return [(images[i], labels[i], seed) for i in range(batch)]


def build_collate(cfg: Any, method: torch.nn.Module) -> Callable:
    """The method's collate from its config's augmentation and masking, as `vfm.pretrain` builds it."""
    from hydra.utils import instantiate

    augment = instantiate(cfg.method.augment)
    masking = instantiate(cfg.method.masking) if cfg.method.get("masking") is not None else None
    return method.build_collate(augment, masking)


def sched_values(cfg: Any, optim: Any, batch: int, n: int, imagenet: bool) -> dict[str, list[float]]:
    """Steps 0..n-1 of every schedule, built as `Trainer.fit` does (nominal epoch length)."""
    from hydra.utils import instantiate

    spe = max(1, NOMINAL_TRAIN_IMAGES["imagenet" if imagenet else "small"] // batch)
    epochs = int(cfg.trainer.max_epochs)
    arrays = {"lr": optim.lr_schedule(batch).build(spe, epochs), "wd": optim.wd_schedule().build(spe, epochs)}
    for name, node in (cfg.method.get("schedules") or {}).items():
        arrays[name] = instantiate(node).build(spe, epochs)
    return {k: [float(x) for x in v[:n].tolist()] + [float(v[-1])] * max(0, n - len(v)) for k, v in arrays.items()}


def describe_views(collate: Any, cfg: Any) -> str:
    aug = collate.augment
    views = f"{aug.n_global}x{aug.global_crop_size}" + (f" + {aug.n_local}x{aug.local_crop_size}" if aug.n_local else "")
    masking = cfg.method.get("masking")
    if masking is not None and "ratio" in masking:
        views += f", mask {masking.ratio}"
    return f"crops {views}"


def crops_of(aug: Any) -> str:
    """"2x224 + 10x96": the global and local crops of a multi-crop augmentation."""
    return f"{aug.n_global}x{aug.global_crop_size} + {aug.n_local}x{aug.local_crop_size}"
