"""A run's learning curve: the evaluations made during training, one point per evaluation, in
`<run>/curves.json` as a list of {"epoch", "step", "metrics"} in step order.

The file follows the checkpoint a run continues from: when training starts (fresh or resumed)
the points after its step are dropped (they were measured on weights that no checkpoint holds, and
will be measured again), and a new point replaces any point at its step or later. Resuming
therefore keeps every earlier point and never repeats one. Each write is atomic.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from vfm.io import atomic_write_json

CURVES_NAME = "curves.json"


def read_curve(path: str | Path) -> list[dict[str, Any]]:
    """The points recorded in `path` ([] when there is no such file)."""
    path = Path(path)
    return json.loads(path.read_text()) if path.is_file() else []


def trim_curve(path: str | Path, step: int) -> None:
    """Keep the points up to `step`, where training (re)starts; a missing file stays missing."""
    points = read_curve(path)
    kept = [p for p in points if p["step"] <= step]
    if len(kept) != len(points):
        atomic_write_json(path, kept)


def add_point(path: str | Path, epoch: float, step: int, metrics: dict[str, float]) -> None:
    """Append the evaluation of the weights after `step` (`epoch` epochs, fractional for a run
    stopped mid-epoch), replacing the points at `step` or later."""
    points = [p for p in read_curve(path) if p["step"] < step]
    atomic_write_json(path, [*points, {"epoch": epoch, "step": step, "metrics": dict(metrics)}])


def validation_metrics(metrics: dict[str, Any], evaluators: list[str]) -> dict[str, float]:
    """The validation values (`<evaluator>/val_*`) of `evaluators` among `metrics`: what the final
    evaluation, which also reads the test split, adds to the curve."""
    return {k: float(v) for k, v in metrics.items()
            if k.split("/", 1)[0] in evaluators and k.split("/", 1)[-1].startswith("val_")}
