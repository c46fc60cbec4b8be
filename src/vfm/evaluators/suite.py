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
) -> dict[str, float]:
    """Return {prefix + metric: value} from every evaluator in `evaluators` (name -> callable
    `(features, num_classes) -> dict`). Features are extracted once and shared."""
    if not evaluators:
        return {}
    feats = extract_split_features(
        encoder, splits, cache_path=cache_path, cache_key=cache_key, batch_size=batch_size,
        device=device, precision=precision, progress=progress,
    )
    metrics: dict[str, float] = {}
    for evaluator in evaluators.values():
        out = evaluator(feats, splits.num_classes)
        metrics.update({f"{prefix}{k}": float(v) for k, v in out.items()})
    return metrics
