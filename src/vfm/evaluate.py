"""`evaluate`: run evaluators on a checkpoint (this project's `last.pt`, exported or timm
`.safetensors` weights, or `random` for the random-initialisation baseline).

    evaluate checkpoint=outputs/pretrain/default/checkpoints/last.pt evaluator=[knn,linear]
    evaluate checkpoint=outputs/pretrain/default/encoder.safetensors dataset=fashion_mnist
    evaluate checkpoint=random backbone=vit_tiny backbone.patch_size=7

The backbone of a `last.pt` comes from the config stored inside it; for `.safetensors` written by
`pretrain` from their metadata; for other timm weight files and `random`, from `backbone=...`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any

import hydra
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from vfm.config import CONF_DIR, ConfigError, register_resolvers, run_or_exit, validate_evaluate
from vfm.engine.checkpoint import CheckpointError, load_checkpoint, load_model_state
from vfm.engine.trainer import select_device
from vfm.evaluators.suite import run_evaluators

log = logging.getLogger("vfm.evaluate")
register_resolvers()


def load_encoder(checkpoint: str, backbone_cfg: DictConfig, seed: int = 0) -> tuple[torch.nn.Module, str]:
    """Return (encoder, cache key) for `checkpoint` ("random", a pretrain .pt, or .safetensors)."""
    if checkpoint == "random":
        torch.manual_seed(seed)
        return instantiate(backbone_cfg), f"random-{seed}-{backbone_cfg.name}"
    path = Path(checkpoint)
    if not path.is_file():
        raise ConfigError(f"checkpoint={checkpoint} does not exist; pass a last.pt, a .safetensors file or 'random'")
    key = f"{path.resolve()}-{path.stat().st_mtime_ns}"
    if path.suffix == ".safetensors":
        from safetensors import safe_open
        from safetensors.torch import load_file

        with safe_open(str(path), framework="pt") as f:
            has_meta = "vfm_backbone" in (f.metadata() or {})
        if has_meta:
            from vfm.backbones import load_exported

            return load_exported(path), key
        backbone = instantiate(backbone_cfg)  # a foreign timm weight file: architecture from backbone=
        try:
            backbone.model.load_state_dict(load_file(str(path)), strict=True)
        except RuntimeError as e:
            raise CheckpointError(f"{path} does not match backbone.name={backbone_cfg.name}: {e}") from e
        return backbone, key
    state = load_checkpoint(path)
    if "config" not in state or "encoder_prefix" not in state:
        raise CheckpointError(f"{path} has no stored config/encoder_prefix; it was not written by `pretrain`")
    bb_cfg = OmegaConf.create(state["config"]["backbone"])
    backbone = instantiate(bb_cfg)
    prefix = state["encoder_prefix"]
    enc_state = {k[len(prefix):]: v for k, v in state["model"].items() if k.startswith(prefix)}
    load_model_state(backbone, enc_state, path)
    return backbone, key


def run(cfg: DictConfig) -> dict[str, Any]:
    validate_evaluate(cfg)
    run_dir = Path(cfg.paths.output_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    device = str(select_device(cfg.trainer.device))
    encoder, key = load_encoder(str(cfg.checkpoint), cfg.backbone, seed=cfg.trainer.seed)
    splits = instantiate(cfg.dataset)
    evaluators = {k: instantiate(v) for k, v in (cfg.get("evaluator") or {}).items()}
    if not evaluators:
        raise ConfigError("no evaluator selected; pass e.g. evaluator=[knn,linear]")
    cache = None
    if cfg.eval.cache_features:
        digest = hashlib.sha1(f"{key}|{cfg.dataset._target_}|{cfg.dataset.get('root', '')}".encode()).hexdigest()[:16]
        cache = run_dir / "features" / f"{digest}.pt"
    metrics = run_evaluators(
        encoder.to(device), splits, evaluators, device=device, batch_size=cfg.eval.batch_size,
        precision=cfg.eval.precision, cache_path=cache, cache_key=key, progress=cfg.trainer.progress,
    )
    tmp = run_dir / ".metrics.json.tmp"
    tmp.write_text(json.dumps({"checkpoint": str(cfg.checkpoint), "metrics": metrics}, indent=2))
    os.replace(tmp, run_dir / "metrics.json")
    logger = instantiate(cfg.logger, save_dir=str(run_dir))
    logger.log_scalars({f"eval/{k}": v for k, v in metrics.items()}, 0)
    logger.close()
    lines = [f"{k:24s} {v:8.2f}" for k, v in metrics.items()]
    print(f"evaluation of {cfg.checkpoint}:\n" + "\n".join(lines), flush=True)
    return metrics


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="evaluate")
def main(cfg: DictConfig) -> float | None:
    return run_or_exit(run, cfg).get("knn/top1")


if __name__ == "__main__":
    main()
