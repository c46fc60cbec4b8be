"""Run a set of feature-based evaluators on one encoder: extract features once, then evaluate."""

from __future__ import annotations

import inspect
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from torch import nn

from vfm.evaluators.features import extract_split_features

log = logging.getLogger(__name__)


def run_evaluators(
    encoder: nn.Module,
    splits: Any,
    evaluators: Mapping[str, Any],
    *,
    device: str = "cpu",
    batch_size: int = 512,
    precision: str = "fp32",
    cache_path: str | Path | None = None,
    cache_key: str = "",
    prefix: str = "",
    progress: bool = True,
    text_model: nn.Module | None = None,
    work_dir: str | Path | None = None,
    distributed: bool = True,
) -> dict[str, float]:
    """Return {prefix + metric: value} from every evaluator in `evaluators` (name -> callable).

    Three kinds: frozen-feature evaluators `(features, num_classes) -> dict` (kNN, linear; features
    are extracted once and shared), image–text evaluators (`needs_text_model`: zero-shot, which
    also gets the class names and `text_model`), and evaluators that train the encoder itself
    (`needs_encoder`: fine-tuning, called with `(encoder, splits, device=)`).

    `work_dir`: where evaluators that train keep their resumable state: an evaluator whose call
    accepts `checkpoint_dir` gets `work_dir / (prefix + name)` (e.g. `<run>/finetune`,
    `<run>/eval/baseline/finetune`), so running the same evaluation again resumes it.
    `distributed=False`: only this process runs the evaluation (pretrain evaluates on rank 0), so
    evaluators that train must not use the process group; they are told so when their call
    accepts `distributed`. With the default, under torchrun every process must call this.
    """
    if not evaluators:
        return {}
    for name, ev in evaluators.items():
        if getattr(ev, "needs_text_model", False) and text_model is None:
            raise ValueError(f"evaluator {name} needs an image-text model (a method=clip checkpoint); "
                             f"this encoder has no text tower")
    feats = None
    if any(not getattr(ev, "needs_encoder", False) for ev in evaluators.values()):
        feats = extract_split_features(
            encoder, splits, cache_path=cache_path, cache_key=cache_key, batch_size=batch_size,
            device=device, precision=precision, progress=progress,
        )
    metrics: dict[str, float] = {}
    for name, evaluator in evaluators.items():
        if getattr(evaluator, "needs_encoder", False):
            kwargs: dict[str, Any] = {}
            if work_dir is not None and _accepts(evaluator, "checkpoint_dir"):
                kwargs["checkpoint_dir"] = Path(work_dir) / f"{prefix}{name}"
            if not distributed and _accepts(evaluator, "distributed"):
                kwargs["distributed"] = False
            out = evaluator(encoder, splits, device=device, **kwargs)
        elif getattr(evaluator, "needs_text_model", False):
            out = evaluator(feats, splits.num_classes, class_names=splits.class_names, text_model=text_model)
        else:
            out = evaluator(feats, splits.num_classes)
        metrics.update({f"{prefix}{k}": float(v) for k, v in out.items()})
    return metrics


def _accepts(fn: Any, name: str) -> bool:
    """Whether calling `fn` accepts the keyword `name` (evaluators without resume support keep
    their plain `(encoder, splits, device=)` call)."""
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):  # builtins / C callables without a signature
        return False
    return name in params or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
