"""`evaluate`: run evaluators on a checkpoint (this project's `last.pt`, exported or timm
`.safetensors` weights, or `random` for the random-initialisation baseline).

    evaluate checkpoint=outputs/pretrain/default/checkpoints/last.pt evaluator=[knn,linear]
    evaluate checkpoint=outputs/pretrain/default/encoder.safetensors dataset=fashion_mnist
    evaluate checkpoint=random backbone=vit_tiny backbone.patch_size=7

The backbone of a `last.pt` comes from the config stored inside it; for `.safetensors` written by
`pretrain` from their metadata; for other timm weight files and `random`, from `backbone=...`.

Evaluators that train (fine-tuning) keep their state in the run directory (`<run>/finetune/`):
the same command run again resumes them. Under torchrun (e.g.
`torchrun --nproc_per_node=2 -m vfm.evaluate ... evaluator=[finetune] trainer.device=cpu`)
fine-tuning is data-parallel; frozen-feature evaluators simply run on every process, and only
rank 0 writes metrics.json, the feature cache and TensorBoard.
"""

from __future__ import annotations

import hashlib
import logging
import sys
from pathlib import Path
from typing import Any

import hydra
import torch
from hydra.utils import get_object, instantiate
from omegaconf import DictConfig, OmegaConf

from vfm import distributed as vdist
from vfm.backbones.loading import EncoderLoadError, load_pretrained_encoder
from vfm.backbones.pixels import PixelEncoder
from vfm.cli import check_command_line, check_run_dir, run_or_exit
from vfm.config import (
    CONF_DIR,
    ConfigError,
    applied_configs,
    dataset_yields_captions,
    instantiate_checked,
    instantiate_evaluators,
    register_resolvers,
    validate_evaluate,
)
from vfm.engine.checkpoint import CheckpointError, load_checkpoint
from vfm.engine.trainer import select_device
from vfm.evaluators.finetune import FineTuneInterrupted
from vfm.evaluators.protocols import ImageTextEvaluator, OptionalImageText
from vfm.evaluators.suite import run_evaluators
from vfm.io import atomic_write_json
from vfm.methods.base import Method

log = logging.getLogger("vfm.evaluate")
register_resolvers()


def load_encoder(checkpoint: str, backbone_cfg: DictConfig, seed: int = 0) -> tuple[torch.nn.Module, str]:
    """Return (encoder, cache key) for `checkpoint` ("random", "pixels", a pretrain .pt, or .safetensors)."""
    if checkpoint == "pixels":  # the raw-pixel baseline: features = the normalised pixels
        return PixelEncoder(), "pixels"
    if checkpoint == "random":
        torch.manual_seed(seed)
        return instantiate(backbone_cfg), f"random-{seed}-{backbone_cfg.name}"
    path = Path(checkpoint)
    if not path.exists():
        raise ConfigError(f"checkpoint={checkpoint} does not exist; pass a last.pt, a .safetensors file, a run directory, 'random' or 'pixels'")
    key = checkpoint_cache_key(path)
    # a file that carries no architecture (a timm / third-party state dict, .safetensors or .pt)
    # is read as backbone=; our checkpoints and exports carry their own, which wins
    bb = OmegaConf.to_container(backbone_cfg, resolve=True)
    name, kwargs = bb.pop("name"), bb.pop("model_kwargs", None) or {}
    kwargs.update({k: bb[k] for k in ("img_size", "patch_size", "in_chans") if bb.get(k) is not None})
    try:
        return load_pretrained_encoder(path, model_name=name, model_kwargs=kwargs), key
    except EncoderLoadError as e:  # the file named is not an encoder (of that backbone): the user's to fix
        raise ConfigError(f"checkpoint={checkpoint}: {e}") from e


def checkpoint_cache_key(path: Path) -> str:
    """The feature-cache key of a checkpoint: the file that is read (for a run directory, its
    encoder.safetensors or checkpoints/last.pt, as `load_pretrained_encoder` picks) and its mtime,
    so that a run trained further or re-exported never reuses the features of the old weights."""
    read = path
    if path.is_dir():
        read = next((f for f in (path / "encoder.safetensors", path / "checkpoints" / "last.pt") if f.is_file()), path)
    return f"{read.resolve()}-{read.stat().st_mtime_ns}"


def set_paper_protocol(cfg: DictConfig) -> None:
    """An evaluator's `paper: null` (whose protocol `auto` follows: the linear probe's feature
    recipe) becomes the `method.eval_protocol` of the run that wrote the checkpoint, read from the
    run directory's config.yaml (the run directory itself, beside encoder.safetensors, or above
    checkpoints/last.pt); without one it stays null (the final [CLS])."""
    nodes = [node for node in (cfg.get("evaluator") or {}).values() if "paper" in node and node.paper is None]
    path = Path(str(cfg.checkpoint))
    run_dir = _run_dir(path)
    if not nodes or not path.exists() or not (run_dir / "config.yaml").is_file():  # random, pixels, a lone file
        return
    paper = OmegaConf.select(OmegaConf.load(run_dir / "config.yaml"), "method.eval_protocol", default=None)
    log.info("linear-probe protocol of %s: %s (method.eval_protocol in %s)", cfg.checkpoint, paper, run_dir / "config.yaml")
    for node in nodes:
        node.paper = paper


def _run_dir(path: Path) -> Path:
    """The run directory of a checkpoint: itself, above checkpoints/last.pt, or beside the file."""
    return path if path.is_dir() else path.parent.parent if path.parent.name == "checkpoints" else path.parent


def is_image_text_run(checkpoint: str) -> bool:
    """Whether `checkpoint` is a `pretrain` run directory or `.pt` checkpoint of a method with a
    text tower (CLIP, SigLIP), as its run's config.yaml says (read without loading any weights).
    Exported `.safetensors` hold the image encoder alone: False, as for `random` and `pixels`."""
    path = Path(checkpoint)
    last = path / "checkpoints" / "last.pt" if path.is_dir() else path
    config = _run_dir(path) / "config.yaml"
    if last.suffix != ".pt" or not last.is_file() or not config.is_file():
        return False
    target = OmegaConf.select(OmegaConf.load(config), "method._target_", default=None)
    if target is None:
        return False
    # a method has a text tower when it overrides Method.text_model (a property, None by default)
    return getattr(get_object(str(target)), "text_model", None) is not Method.text_model


def load_method(checkpoint: str) -> Method:
    """The whole pretraining method of a `pretrain` checkpoint (or run directory), rebuilt from the
    config stored inside it, with its weights (e.g. CLIP's text tower and projections)."""
    from vfm.pretrain import build_method

    path = Path(checkpoint)
    if path.is_dir():
        path = path / "checkpoints" / "last.pt"
    if path.suffix != ".pt" or not path.is_file():
        raise ConfigError(f"checkpoint={checkpoint}: zero-shot needs a pretrain run directory or its last.pt")
    try:
        state = load_checkpoint(path)
    except CheckpointError as e:
        raise ConfigError(f"checkpoint={checkpoint}: {e}") from e
    if "config" not in state:
        raise CheckpointError(f"{path} has no stored config; it was not written by `pretrain`")
    method = build_method(OmegaConf.create(state["config"]))
    method.load_state_dict(state["model"], strict=True)
    return method


def run(cfg: DictConfig) -> dict[str, Any]:
    validate_evaluate(cfg)
    # as pretrain: under torchrun, join the process group first (select_device then picks this
    # process's local GPU)
    device_type = "cuda" if (cfg.trainer.device.startswith("cuda") or (cfg.trainer.device == "auto" and torch.cuda.is_available())) else "cpu"
    vdist.init_distributed(device_type)
    run_dir = Path(cfg.paths.output_dir)
    check_run_dir(run_dir, "paths.output_dir")
    run_dir.mkdir(parents=True, exist_ok=True)
    applied = applied_configs()
    if applied is not None:
        log.info("config files (in merge order, later ones win): %s", ", ".join(applied["files"]))
    device = str(select_device(cfg.trainer.device))
    set_paper_protocol(cfg)
    evaluators = instantiate_evaluators(cfg)
    if not evaluators:
        raise ConfigError("no evaluator selected; pass e.g. evaluator=[knn,linear]")
    encoder, key, text_model = load_models(cfg, evaluators, device)
    splits = instantiate_checked(cfg.dataset, "dataset")
    cache = None
    if cfg.eval.cache_features:
        digest = hashlib.sha1(f"{key}|{cfg.dataset._target_}|{cfg.dataset.get('root', '')}".encode()).hexdigest()[:16]
        cache = run_dir / "features" / f"{digest}.pt"
    figures: dict[str, torch.Tensor] = {}  # e.g. predicted masks, for TensorBoard
    metrics = run_evaluators(
        encoder.to(device), splits, evaluators, device=device, batch_size=cfg.eval.batch_size,
        precision=cfg.eval.precision, cache_path=cache, cache_key=key, progress=cfg.trainer.progress,
        text_model=text_model, work_dir=run_dir, on_figure=figures.__setitem__,
    )
    if vdist.get_rank() == 0:
        _write_results(cfg, run_dir, metrics, applied, figures)
    vdist.wait_for_main()  # rank 0 may have evaluated alone for a long time
    return metrics


def load_models(cfg: DictConfig, evaluators: dict[str, Any], device: str) -> tuple[torch.nn.Module, str, torch.nn.Module | None]:
    """(encoder, feature-cache key, text model): the whole pretraining method when an image-text
    evaluator needs its text tower (zero-shot) or one can use it (retrieval's image<->text recall:
    an image-text run evaluated on a captioned dataset), else the encoder alone."""
    needs_text = any(isinstance(ev, ImageTextEvaluator) for ev in evaluators.values())
    uses_text = (any(isinstance(ev, OptionalImageText) for ev in evaluators.values())
                 and dataset_yields_captions(str(cfg.dataset._target_)) and is_image_text_run(str(cfg.checkpoint)))
    if not needs_text and not uses_text:
        encoder, key = load_encoder(str(cfg.checkpoint), cfg.backbone, seed=cfg.trainer.seed)
        return encoder, key, None
    method = load_method(str(cfg.checkpoint))
    if method.text_model is None:
        raise ConfigError(f"evaluator=[zero_shot] needs an image-text checkpoint (method=clip); "
                          f"{cfg.checkpoint} is a {type(method).__name__} run")
    method.to(device).eval()
    # the whole method comes from last.pt: its mtime keys the cache, as the encoder's does
    last = Path(str(cfg.checkpoint))
    last = last / "checkpoints" / "last.pt" if last.is_dir() else last
    return method.encoder, f"{checkpoint_cache_key(last)}-clip", method.text_model


def _write_results(cfg: DictConfig, run_dir: Path, metrics: dict[str, float], applied: dict[str, list[str]] | None,
                   figures: dict[str, torch.Tensor] | None = None) -> None:
    """metrics.json (with the config files applied), TensorBoard (with `figures`), and the metrics on stdout."""
    atomic_write_json(run_dir / "metrics.json", {
        "checkpoint": str(cfg.checkpoint), "metrics": metrics,
        "config_files": applied and applied["files"], "overrides": applied and applied["overrides"],
    })
    logger = instantiate(cfg.logger, save_dir=str(run_dir))
    logger.log_scalars({f"eval/{k}": v for k, v in metrics.items()}, 0)
    for tag, image in (figures or {}).items():
        logger.log_image(f"eval/{tag}", image, 0)
    logger.close()
    lines = [f"{k:24s} {v:8.2f}" for k, v in metrics.items()]
    print(f"evaluation of {cfg.checkpoint}:\n" + "\n".join(lines), flush=True)


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="evaluate")
def hydra_main(cfg: DictConfig) -> float | None:
    try:
        return run_or_exit(run, cfg).get("knn/top1")
    except FineTuneInterrupted as e:  # a planned stop (stop_after_epoch), not a crash: no traceback
        print(f"interrupted: {e}", file=sys.stderr, flush=True)
        raise SystemExit(3) from None
    finally:
        vdist.destroy()


def main() -> None:
    """The `evaluate` command: our checks of the command line (a misspelt key, an unwritable run
    directory) report first, then Hydra composes and runs `hydra_main`."""
    check_command_line("evaluate")
    hydra_main()


if __name__ == "__main__":
    main()
