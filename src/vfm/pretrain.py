"""`pretrain`: the pretraining entry point. Thin: compose, validate, build, train, evaluate.

    pretrain                                  # DINO on Fashion-MNIST (the CPU recipe)
    pretrain method=dino optim.blr=1e-3 trainer.max_epochs=5
    torchrun --nproc_per_node=2 -m vfm.pretrain trainer.device=cpu

`run(cfg)` returns the final metrics and is what tests call.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import random
import signal
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import hydra
import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from vfm import distributed as vdist
from vfm.backbones import Backbone
from vfm.cli import check_command_line, check_run_dir, run_or_exit
from vfm.config import (
    CONF_DIR,
    METHOD_COMPONENT_KEYS,
    ConfigError,
    applied_configs,
    instantiate_checked,
    instantiate_evaluators,
    register_resolvers,
    validate_pretrain,
)
from vfm.data.collate import Collate
from vfm.data.datasets import BadFileDataset, DataSplits
from vfm.engine.curves import CURVES_NAME, add_point, validation_metrics
from vfm.engine.logging import NullLogger
from vfm.engine.preemption import Preempted, requeue_slurm_job
from vfm.engine.trainer import Trainer, select_device
from vfm.evaluators.protocols import Evaluator
from vfm.evaluators.suite import run_evaluators, without_image_text
from vfm.io import atomic_write_json, atomic_write_text
from vfm.methods.base import Method

log = logging.getLogger("vfm.pretrain")
register_resolvers()


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def build_method(cfg: DictConfig) -> Method:
    """Backbone + method from the config, seeded so the same config always gives the same init."""
    seed_everything(cfg.trainer.seed)
    backbone = instantiate_checked(cfg.backbone, "backbone")
    # resolve first: method keys may interpolate its components (n_global_crops: ${.augment.n_global})
    node = OmegaConf.to_container(cfg.method, resolve=True)
    method_cfg = {k: v for k, v in node.items() if k not in METHOD_COMPONENT_KEYS}  # type: ignore[union-attr]
    # a method that rejects its inputs (a teacher/tokenizer file that is missing or whose patch
    # grid does not match) says why in a ValueError: a config error, not a traceback
    return instantiate_checked(method_cfg, "method", backbone=backbone)


def build_random_encoder(cfg: DictConfig) -> torch.nn.Module:
    """The encoder exactly as initialised before pretraining: the method is built again from the
    same seed, so its encoder has the same weights, including what the method changes at
    construction (MAE's fixed sin-cos position embedding, a mask token)."""
    return build_method(cfg).encoder


def dataset_name(cfg: DictConfig) -> str:
    return str(cfg.dataset.get("variant") or cfg.dataset._target_.rsplit(".", 1)[-1])


def encoder_prefix(method: torch.nn.Module) -> str:
    """State-dict prefix of `method.encoder` inside the method (e.g. "teacher.backbone.")."""
    for name, module in method.named_modules():
        if module is method.encoder:
            return f"{name}." if name else ""
    raise ValueError("method.encoder is not a submodule of the method")


def format_table(metrics: dict[str, float], method_name: str) -> str:
    names = sorted({k.split("/")[0] for k in metrics if k.endswith("top1") and not k.startswith("baseline/")})
    cols = [n for n in names if f"{n}/top1" in metrics]
    header = "| encoder | " + " | ".join(f"{c} top-1 (test)" for c in cols) + " |"
    lines = [header, "|---" * (len(cols) + 1) + "|"]
    lines.append(f"| pretrained ({method_name}) | " + " | ".join(f"{metrics[f'{c}/top1']:.2f}" for c in cols) + " |")
    if any(k.startswith("baseline/") for k in metrics):
        lines.append(
            "| random init | " + " | ".join(f"{metrics.get(f'baseline/{c}/top1', float('nan')):.2f}" for c in cols) + " |"
        )
    return "\n".join(lines)


@dataclass
class Components:
    """Everything `run` builds from the config before training (the phases below share it)."""

    method: Method
    masking: Callable[..., torch.Tensor] | None  # the method's patch-mask sampler, if it masks
    collate: Collate
    schedules: dict[str, Any]
    optim: Any
    trainer: Trainer
    splits: DataSplits
    evaluators: dict[str, Evaluator]
    logger: Any
    eval_kw: dict[str, Any]  # what every run_evaluators call here shares


def run(cfg: DictConfig) -> dict[str, Any]:
    """Pretrain as configured and return the final metrics (also written to metrics.json)."""
    validate_pretrain(cfg, vdist.env_world_size())  # fails fast: nothing built or read yet
    run_dir = set_up_run(cfg)
    parts = build_components(cfg, run_dir)
    # rank 0 writes the log and metrics.json; recomputing Hydra's defaults list costs ~0.15 s
    provenance = log_start(cfg, parts.method, run_dir) if vdist.get_rank() == 0 else {}
    result = train(cfg, parts, run_dir)
    metrics: dict[str, Any] = {}
    if vdist.get_rank() == 0:
        metrics = final_evaluation(cfg, parts, run_dir, result)
        finish(cfg, parts, run_dir, result, metrics, provenance)
    vdist.wait_for_main()
    return metrics


def set_up_run(cfg: DictConfig) -> Path:
    """Join the process group (under torchrun) and create the run directory with the resolved
    config in it (rank 0)."""
    device_type = "cuda" if (cfg.trainer.device.startswith("cuda") or (cfg.trainer.device == "auto" and torch.cuda.is_available())) else "cpu"
    vdist.init_distributed(device_type, timeout_s=cfg.trainer.dist_timeout_s)
    run_dir = Path(cfg.paths.output_dir)
    check_run_dir(run_dir, "paths.output_dir")
    run_dir.mkdir(parents=True, exist_ok=True)
    if vdist.get_rank() == 0:
        atomic_write_text(run_dir / "config.yaml", OmegaConf.to_yaml(cfg, resolve=True))
    return run_dir


def build_components(cfg: DictConfig, run_dir: Path) -> Components:
    """The method (seeded), its data pipeline, optimizer, schedules, trainer, the data (the first
    read), the evaluators and the logger."""
    method = build_method(cfg)
    augment = instantiate_checked(cfg.method.augment, "method.augment")
    masking = instantiate_checked(cfg.method.masking, "method.masking") if cfg.method.get("masking") is not None else None
    collate = method.build_collate(augment, masking)
    schedules = {k: instantiate_checked(v, f"method.schedules.{k}") for k, v in (cfg.method.get("schedules") or {}).items()}
    optim = instantiate_checked(cfg.optim, "optim")
    trainer = instantiate_checked(cfg.trainer, "trainer")
    splits = instantiate_checked(cfg.dataset, "dataset")  # the first data read
    check_training_data(cfg, splits.train, vdist.get_world_size())
    evaluators = instantiate_evaluators(cfg)
    if cfg.eval.every_n_epochs and splits.val is None:
        raise ConfigError(
            f"eval.every_n_epochs={cfg.eval.every_n_epochs} evaluates on the validation split during training, but "
            f"dataset {dataset_name(cfg)} has none; give it one (e.g. dataset.val_fraction=0.1) or set eval.every_n_epochs=0"
        )
    logger = instantiate_checked(cfg.logger, "logger", save_dir=str(run_dir)) if vdist.get_rank() == 0 else NullLogger()
    logger.log_text("config", OmegaConf.to_yaml(cfg, resolve=True))
    # distributed=False: every evaluation below runs on rank 0 alone (the others wait at a barrier),
    # so fine-tuning must not wait for them in DDP collectives
    eval_kw = dict(device=str(select_device(cfg.trainer.device)), batch_size=cfg.eval.batch_size,
                   precision=cfg.eval.precision, progress=trainer.progress, distributed=False)
    return Components(method, masking, collate, schedules, optim, trainer, splits, evaluators, logger, eval_kw)


def check_training_data(cfg: DictConfig, train: Any, world_size: int) -> None:
    """Config errors for training data that cannot train: fewer images than one global batch
    (an epoch without a single optimisation step) or, for files decoded as they are read, a
    first item that cannot be decoded even after skipping (the folder holds no readable image)."""
    per_process = cfg.trainer.batch_size // world_size
    if math.ceil(len(train) / world_size) < per_process:  # the sampler pads each process's share
        per = world_size * cfg.trainer.accum_steps
        fix = f"trainer.batch_size={per * (len(train) // per)}" if len(train) >= per else "more images"
        raise ConfigError(
            f"the training set ({dataset_name(cfg)}) has {len(train)} images, fewer than one batch of "
            f"trainer.batch_size={cfg.trainer.batch_size}: one epoch would have no optimisation step; use {fix}"
        )
    if not isinstance(train, BadFileDataset):
        return
    try:
        train[0]
    except RuntimeError as e:
        if train.num_skipped == 0:  # not the bad-file policy giving up: a bug
            raise
        key = next((k for k in ("root", "train_csv", "urls") if k in cfg.dataset), "_target_")  # where the files are
        raise ConfigError(
            f"dataset.{key}={cfg.dataset[key]}: none of the first {train.num_skipped} images could be decoded (the "
            f"warnings above name them), so the data looks corrupt, not sprinkled with the odd bad file that "
            f"dataset.bad_files={cfg.dataset.get('bad_files')} skips; check the files of dataset.{key}"
        ) from e


def log_start(cfg: DictConfig, method: Method, run_dir: Path) -> dict[str, Any]:
    """Say what runs: the config files applied (presets included), the command-line overrides and
    the backbone as built. Returns the same, for metrics.json."""
    applied = applied_configs()
    backbone = describe_backbone(method.encoder)
    log.info("pretraining %s on %s -> %s", _method_name(cfg), dataset_name(cfg), run_dir)
    if applied is None:
        log.info("config files: not known (the config was composed outside a `pretrain` command)")
    else:
        log.info("config files (in merge order, later ones win): %s", ", ".join(applied["files"]))
        log.info("overrides: %s", " ".join(applied["overrides"]) or "none")
    log.info("backbone: %s", format_backbone(backbone))
    return {"config_files": applied and applied["files"], "overrides": applied and applied["overrides"],
            "backbone": backbone}


def train(cfg: DictConfig, parts: Components, run_dir: Path) -> dict[str, Any]:
    """`Trainer.fit` on the training split, evaluating every `eval.every_n_epochs` epochs: the
    `eval.periodic` evaluators on the validation split only (the test split is read once, after
    training), each result a point of `<run>/curves.json`."""
    method = parts.method
    # some of the run's evaluators (validate_pretrain), when evaluating during training at all
    periodic = {name: parts.evaluators[name] for name in cfg.eval.periodic} if cfg.eval.every_n_epochs else {}
    # without its test split the evaluators can only report validation metrics (knn/val_top1, ...)
    val_splits = dataclasses.replace(parts.splits, test=None)

    def evaluate_fn(encoder: torch.nn.Module, epoch: int) -> dict[str, float]:
        visualize(encoder, parts.splits, run_dir, parts.logger, epoch, method=method, masking=parts.masking)
        return run_evaluators(encoder, val_splits, periodic, text_model=method.text_model, **parts.eval_kw,
                              on_figure=lambda tag, image: parts.logger.log_image(f"eval/{tag}", image, epoch))

    return parts.trainer.fit(
        method, parts.splits.train, parts.collate, optim=parts.optim, schedules=parts.schedules, run_dir=run_dir,
        logger=parts.logger, evaluate_fn=evaluate_fn, eval_every_n_epochs=cfg.eval.every_n_epochs,
        extra_state={"config": OmegaConf.to_container(cfg, resolve=True), "encoder_prefix": encoder_prefix(method)},
        eval_curves=run_dir / CURVES_NAME if cfg.eval.every_n_epochs else None,
    )


def final_evaluation(cfg: DictConfig, parts: Components, run_dir: Path, result: dict[str, Any]) -> dict[str, Any]:
    """Rank 0, after training: export, visualise, the method's own report, every evaluator on the
    trained encoder and (`eval.baseline`) on the same encoder at random initialisation."""
    method, splits, evaluators = parts.method, parts.splits, parts.evaluators
    _export(method, run_dir, cfg)
    visualize(method.encoder, splits, run_dir, parts.logger, cfg.trainer.max_epochs, method=method, masking=parts.masking)
    metrics: dict[str, Any] = _method_report(method, splits)  # e.g. a tokenizer's codebook usage
    cache = run_dir / "features" if cfg.eval.cache_features else None
    # work_dir: fine-tuning keeps its state in <run>/eval/finetune, so running the same
    # command again (training already done) resumes it
    metrics.update(run_evaluators(
        method.encoder, splits, evaluators, cache_path=cache and cache / "pretrained.pt",
        cache_key=f"step{result['step']}", text_model=method.text_model, work_dir=run_dir / "eval", **parts.eval_kw,
        on_figure=lambda tag, image: parts.logger.log_image(f"final/{tag}", image, result["step"]),
    ))
    # the random-init baseline: no text tower to zero-shot with
    baseline_evs = without_image_text(evaluators)
    if cfg.eval.baseline and baseline_evs:
        metrics.update(run_evaluators(
            build_random_encoder(cfg).to(parts.eval_kw["device"]), splits, baseline_evs, prefix="baseline/",
            cache_path=cache and cache / "random_init.pt", cache_key="random",
            work_dir=run_dir / "eval", **parts.eval_kw,  # -> <run>/eval/baseline/finetune
        ))
    history = result["history"]
    metrics.update({
        "train/steps": result["step"], "train/epochs": result["epoch"],
        "train/final_loss": history[-1]["loss"] if history else float("nan"),
        "train/images_per_s": float(np.mean([h["images_per_s"] for h in history])) if history else float("nan"),
        "train/seconds": float(sum(h["seconds"] for h in history)),
    })
    return metrics


def finish(cfg: DictConfig, parts: Components, run_dir: Path, result: dict[str, Any], metrics: dict[str, Any],
           provenance: dict[str, Any]) -> None:
    """metrics.json (the metrics, the lr rule, the config files, the backbone), TensorBoard's
    final scalars and hparams, and the results table in the log."""
    atomic_write_json(run_dir / "metrics.json", {"metrics": metrics, "lr_rule": result["lr_rule"], **provenance})
    if cfg.eval.every_n_epochs:  # the curve's last point: the final weights on the validation split
        add_point(run_dir / CURVES_NAME, result["epoch"], result["step"],
                  validation_metrics(metrics, list(cfg.eval.periodic)))
    logger = parts.logger
    logger.log_scalars({f"final/{k}": v for k, v in metrics.items()}, result["step"])
    logger.log_hparams(_hparams(cfg), {k: v for k, v in metrics.items() if "/" in k})
    logger.close()
    if any(k.endswith("top1") for k in metrics):
        log.info("final evaluation (%s):\n%s", run_dir, format_table(metrics, _method_name(cfg)))


def describe_backbone(backbone: Backbone) -> dict[str, Any]:
    """The backbone as built: the timm name and what the config's overrides made of it (a
    `vit_tiny_patch16_224` with `depth: 6` and `patch_size: 7` is neither tiny-12 nor 16 px)."""
    info: dict[str, Any] = {"timm_name": backbone.name}
    if backbone.is_vit:  # timm VisionTransformer
        vit = backbone.model
        info.update(depth=len(vit.blocks), embed_dim=backbone.embed_dim, num_heads=int(vit.blocks[0].attn.num_heads),
                    patch_size=backbone.patch_size, img_size=int(vit.patch_embed.img_size[0]))
    else:
        info["embed_dim"] = backbone.embed_dim
    info["in_chans"] = int(backbone.create_kwargs["in_chans"])
    info["params"] = sum(p.numel() for p in backbone.parameters())
    return info


def format_backbone(info: dict[str, Any]) -> str:
    """E.g. "vit_tiny_patch16_224 with depth=6, embed_dim=192, ..., in_chans=1: 2,682,624 parameters"."""
    sizes = ", ".join(f"{k}={v}" for k, v in info.items() if k not in ("timm_name", "params"))
    return f"{info['timm_name']} with {sizes}: {info['params']:,} parameters"


def _method_name(cfg: DictConfig) -> str:
    return str(cfg.method._target_).rsplit(".", 1)[-1]


def visualize(
    encoder: Backbone, splits: DataSplits, run_dir: Path, logger: Any, epoch: int, n: int = 8,
    method: Method | None = None, masking: Callable[..., torch.Tensor] | None = None,
) -> None:
    """Attention maps and patch PCA of the first `n` validation images, and what the method
    draws itself (`Method.visualizations`: MAE's reconstructions): PNGs in <run>/viz and
    TensorBoard images (ViT encoders only; a no-op for CNNs)."""
    if not encoder.has_patch_tokens:
        return
    from vfm.viz import render_figures, save_png

    images = _first_val_images(splits, n)
    grids = render_figures(encoder, images, mean=splits.mean, std=splits.std)
    if method is not None:
        grids.update(method.visualizations(images, mean=splits.mean, std=splits.std, masking=masking))
    for name, grid in grids.items():
        save_png(grid, run_dir / "viz" / f"{name}_epoch{epoch:04d}.png")
        logger.log_image(f"viz/{name}", grid, epoch)


def _first_val_images(splits: DataSplits, n: int) -> torch.Tensor:
    """uint8 [n, C, H, W]: the first n validation images (training images without a val split)."""
    ds = splits.val if splits.val is not None else splits.train
    return torch.stack([ds[i][0] for i in range(min(n, len(ds)))])


def _method_report(method: Method, splits: DataSplits) -> dict[str, float]:
    """`method.report` on the first `method.report_images` validation images (none for most methods)."""
    from vfm.data.transforms import normalize

    if method.report_images == 0:
        return {}
    images = normalize(_first_val_images(splits, method.report_images), splits.mean, splits.std)
    report = method.report(images)
    log.info("%s on %d validation images: %s", type(method).__name__, len(images),
             ", ".join(f"{k}={v:.4g}" for k, v in report.items()))
    return report


def _export(method: Method, run_dir: Path, cfg: DictConfig) -> None:
    path = method.encoder.export(run_dir / "encoder.safetensors")
    log.info("exported encoder weights (timm %s) to %s", cfg.backbone.name, path)
    for path in method.export_artifacts(run_dir):  # e.g. a trained tokenizer
        log.info("exported %s", path)


def _requeue_after_time_limit(e: BaseException) -> None:
    """SLURM's time-limit warning (`--signal=USR1@120`) stopped training: put the job back in the
    queue; the requeued job runs the same command and resumes from the checkpoint just written.
    SIGTERM (preemption, scancel) is left to SLURM: it requeues preempted jobs itself."""
    if isinstance(e, Preempted) and e.signum == signal.SIGUSR1 and vdist.get_rank() == 0:
        requeue_slurm_job()


def _hparams(cfg: DictConfig) -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for group in ("method", "optim", "trainer", "backbone"):
        node = OmegaConf.to_container(cfg[group], resolve=True)
        for k, v in node.items():  # type: ignore[union-attr]
            if isinstance(v, (int, float, str, bool)):
                flat[f"{group}.{k}"] = v
    flat["dataset"] = dataset_name(cfg)
    return flat


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="pretrain")
def hydra_main(cfg: DictConfig) -> float | None:
    try:
        metrics = run_or_exit(run, cfg, on_error=_requeue_after_time_limit)
    finally:
        vdist.destroy()
    # Hydra sweepers (e.g. Optuna) optimise the returned value: the headline metric.
    return metrics.get("knn/top1") if metrics else None


def main() -> None:
    """The `pretrain` command: our checks of the command line (a misspelt key, an unwritable run
    directory) report first, then Hydra composes and runs `hydra_main`."""
    check_command_line("pretrain")
    hydra_main()


if __name__ == "__main__":
    main()
