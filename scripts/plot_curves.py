"""Plot the learning curves of `pretrain` runs: a validation metric against the epoch.

    python scripts/plot_curves.py outputs/results/dino --out docs/images/curves/dino.png
    python scripts/plot_curves.py RUN_A RUN_B --out curves.png --metric linear/val_top1

Each run directory holds `curves.json` (written when the run had `eval.every_n_epochs`: one point
per evaluation during training, on the validation split, the last one the final weights). One line
per run; when the run's `metrics.json` has the same metric for the encoder at random
initialisation (`baseline/<metric>`, `eval.baseline=true`), a dashed line of the same colour marks
it. Test metrics are never drawn: `curves.json` holds none.

Needs matplotlib (`pip install 'vfm[report]'`); not vfm itself. Exit status 2 for a run directory
without `curves.json` or a metric no point has.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

DEFAULT_METRIC = "knn/val_top1"


def read_run(run_dir: Path, metric: str) -> tuple[list[float], list[float], float | None]:
    """(epochs, values) of `metric` in `run_dir/curves.json` and its random-init value (None without one)."""
    points: list[dict[str, Any]] = json.loads((run_dir / "curves.json").read_text())
    shown = [p for p in points if metric in p["metrics"]]
    baseline = None
    metrics_file = run_dir / "metrics.json"
    if metrics_file.is_file():
        baseline = json.loads(metrics_file.read_text()).get("metrics", {}).get(f"baseline/{metric}")
    return [float(p["epoch"]) for p in shown], [float(p["metrics"][metric]) for p in shown], baseline


def plot(runs: dict[str, tuple[list[float], list[float], float | None]], metric: str, out: Path,
         title: str | None = None) -> Any:
    """Write the PNG `out` (its folder made) with one line per run; returns the matplotlib Figure."""
    # Figure + the Agg canvas rather than pyplot: no display, no global backend switch
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.4, 4.0), layout="constrained")
    ax = fig.subplots()
    for i, (name, (epochs, values, baseline)) in enumerate(runs.items()):
        color = f"C{i % 10}"
        ax.plot(epochs, values, marker="o", color=color, label=name)
        if baseline is not None:
            ax.axhline(baseline, color=color, linestyle="--", linewidth=1, label=f"{name}, random init")
    ax.set_xlabel("epoch")
    ax.set_ylabel(metric)
    ax.set_xlim(left=0)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    if title:
        ax.set_title(title)
    out.parent.mkdir(parents=True, exist_ok=True)
    FigureCanvasAgg(fig).print_png(str(out))
    return fig


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="+", type=Path, help="pretrain run directories (each with curves.json)")
    ap.add_argument("--out", type=Path, required=True, help="the PNG to write")
    ap.add_argument("--metric", default=DEFAULT_METRIC, help=f"a validation metric (default {DEFAULT_METRIC})")
    ap.add_argument("--title", default=None)
    args = ap.parse_args(argv)
    runs = {}
    for run_dir in args.runs:
        if not (run_dir / "curves.json").is_file():
            print(f"{run_dir}: no curves.json; pretrain with eval.every_n_epochs=1 writes it", file=sys.stderr)
            return 2
        epochs, values, baseline = read_run(run_dir, args.metric)
        if not epochs:
            print(f"{run_dir}/curves.json has no {args.metric}; pass --metric (e.g. {DEFAULT_METRIC})", file=sys.stderr)
            return 2
        runs[run_dir.resolve().name] = (epochs, values, baseline)
    plot(runs, args.metric, args.out, args.title)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
