"""Run named sets of `pretrain` overrides in parallel processes and tabulate the final metrics.

This is how the Fashion-MNIST recipe in the README was chosen (on one GPU, 5 runs at a time):

    python scripts/recipe_sweep.py --parallel 5 --out sweep/ -- trainer.device=cuda \
        +evaluator.knn.device=cuda +evaluator.linear.device=cuda

Each run is a normal `pretrain` run directory under `--out`; `results.jsonl` and `results.md`
list every run's overrides, steps and the pretrained / random-init kNN and linear accuracy.
Runs already finished (a metrics.json exists) are not run again.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

# (name, overrides): deltas over the default `pretrain` (the dino_fashion_mnist recipe)
RUNS: list[tuple[str, list[str]]] = [
    ("recipe", []),
    ("bs256", ["trainer.batch_size=256"]),
    ("bs64", ["trainer.batch_size=64"]),
    ("blr5e-4", ["optim.blr=5e-4"]),
    ("blr2e-3", ["optim.blr=2e-3"]),
    ("ema0.99", ["method.schedules.teacher_momentum.base=0.99"]),
    ("ema0.996", ["method.schedules.teacher_momentum.base=0.996"]),
    ("out1024", ["method.out_dim=1024"]),
    ("out16k", ["method.out_dim=16384"]),
    ("nlocal2", ["method.augment.n_local=2"]),
    ("nlocal6", ["method.augment.n_local=6"]),
    ("freeze1", ["method.schedules.freeze_last_layer.epochs=1"]),
    ("depth12", ["backbone=vit_tiny", "trainer.max_epochs=2"]),
]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="outputs/recipe_sweep")
    ap.add_argument("--parallel", type=int, default=1)
    ap.add_argument("--only", default="", help="comma-separated run names")
    ap.add_argument("common", nargs="*", help="overrides added to every run (after --)")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    todo = [r for r in RUNS if not args.only or r[0] in args.only.split(",")]
    common = ["trainer.progress=false", "logger=none", *args.common]
    running: dict[str, tuple[subprocess.Popen, float]] = {}
    results = []
    while todo or running:
        while todo and len(running) < args.parallel:
            name, overrides = todo.pop(0)
            run_dir = out / name
            if (run_dir / "metrics.json").is_file():
                results.append(_record(name, overrides, run_dir, 0.0))
                continue
            run_dir.mkdir(parents=True, exist_ok=True)
            cmd = [sys.executable, "-m", "vfm.pretrain", *common, *overrides, f"hydra.run.dir={run_dir}"]
            log = open(run_dir / "stdout.txt", "w")  # noqa: SIM115 - closed when the process ends
            running[name] = (subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=os.environ), time.time())
            running[name][0].overrides = overrides  # type: ignore[attr-defined]
        for name, (proc, t0) in list(running.items()):
            if proc.poll() is not None:
                results.append(_record(name, proc.overrides, out / name, time.time() - t0))  # type: ignore[attr-defined]
                print(json.dumps(results[-1]), flush=True)
                del running[name]
        time.sleep(1)
    (out / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in results))
    lines = ["| run | overrides | steps | kNN | linear | kNN random init | linear random init |", "|---" * 7 + "|"]
    for r in results:
        m = r.get("metrics", {})
        cells = [m.get(k, float("nan")) for k in ("knn/top1", "linear/top1", "baseline/knn/top1", "baseline/linear/top1")]
        lines.append(f"| {r['name']} | {' '.join(r['overrides'])} | {int(m.get('train/steps', 0))} | "
                     + " | ".join(f"{c:.2f}" for c in cells) + " |")
    (out / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0 if all("metrics" in r for r in results) else 1


def _record(name: str, overrides: list[str], run_dir: Path, seconds: float) -> dict:
    rec: dict = {"name": name, "overrides": overrides, "seconds": round(seconds, 1)}
    try:
        rec["metrics"] = json.loads((run_dir / "metrics.json").read_text())["metrics"]
    except (OSError, ValueError, KeyError) as e:
        rec["error"] = f"{e!r}; see {run_dir / 'stdout.txt'}"
    return rec


if __name__ == "__main__":
    sys.exit(main())
