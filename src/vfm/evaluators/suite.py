"""Run a set of feature-based evaluators on one encoder: extract features once, then evaluate."""

from __future__ import annotations

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
) -> dict[str, float]:
    """Return {prefix + metric: value} from every evaluator in `evaluators` (name -> callable).

    Three kinds: frozen-feature evaluators `(features, num_classes) -> dict` (kNN, linear; features
    are extracted once and shared), image–text evaluators (`needs_text_model`: zero-shot, which
    also gets the class names and `text_model`), and evaluators that train the encoder itself
    (`needs_encoder`: fine-tuning, called with `(encoder, splits, device=)`).
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
    for evaluator in evaluators.values():
        if getattr(evaluator, "needs_encoder", False):
            out = evaluator(encoder, splits, device=device)
        elif getattr(evaluator, "needs_text_model", False):
            out = evaluator(feats, splits.num_classes, class_names=splits.class_names, text_model=text_model)
        else:
            out = evaluator(feats, splits.num_classes)
        metrics.update({f"{prefix}{k}": float(v) for k, v in out.items()})
    return metrics
