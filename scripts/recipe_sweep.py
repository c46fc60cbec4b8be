"""Run named sets of `pretrain` overrides in parallel processes and tabulate their validation metrics.

`--runs recipe` (the default) sweeps single deltas around the DINO recipe
(conf/recipe/dino_fashion_mnist.yaml). Its batch-size, EMA and lr runs chose that recipe's batch
of 64 on validation (docs/recipes.md), one run at a time on a 2-core CPU (about 20 minutes a run),
as deltas over the batch-128 recipe they started from:

    python scripts/recipe_sweep.py --runs recipe --only recipe,ema0.99,bs256,blr5e-4,bs64,blr2e-3 \
        --out outputs/sweep-dino -- 'evaluator=[knn,linear]' eval.baseline=false trainer.batch_size=128

`--runs first_sweep` is the first sweep, 29 runs on one GPU (`--parallel 5 -- trainer.device=cuda
+evaluator.knn.device=cuda +evaluator.linear.device=cuda`); it ranked on the test split and is kept
as a record. `--runs supervised` compares augmentations for `method=supervised` on 28 px images.

Each run is a normal `pretrain` run directory under `--out`; `results.jsonl` and `results.md`
list every run's overrides, steps and the pretrained / random-init kNN and linear accuracy **on
the validation split**, ranked by `--select` (a validation metric; `select_best` refuses any
other). Test accuracy is not shown: the chosen recipe is read on test once, by `make results`.
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

# (name, overrides): deltas over the default `pretrain` (the dino_fashion_mnist recipe). The validation
# sweep ran them over its batch-128 predecessor (`-- trainer.batch_size=128`): there, bs64 is today's recipe.
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


# The first sweep (docs/recipes.md; it ranked on test and is kept as a record): round 1 around the
# first base (batch 256, EMA 0.99, 4 epochs), round 2 around batch 128 (EMA 0.99, 4 epochs), written
# as deltas over today's recipe (batch 64, EMA 0.98, 3 epochs).
_R1 = ["trainer.max_epochs=4", "trainer.batch_size=256", "method.schedules.teacher_momentum.base=0.99"]
_R2 = ["trainer.max_epochs=4", "trainer.batch_size=128", "method.schedules.teacher_momentum.base=0.99"]
FIRST_SWEEP_RUNS: list[tuple[str, list[str]]] = [
    ("base", _R1),
    ("blr5e-4", _R1 + ["optim.blr=5e-4"]),
    ("blr2e-3", _R1 + ["optim.blr=2e-3"]),
    ("out1024", _R1 + ["method.out_dim=1024"]),
    ("out16k", _R1 + ["method.out_dim=16384"]),
    ("mom996", _R1 + ["method.schedules.teacher_momentum.base=0.996"]),
    ("scales", _R1 + ["method.augment.local_scale=[0.2,0.5]", "method.augment.global_scale=[0.5,1.0]"]),
    ("nlocal6", _R1 + ["method.augment.n_local=6"]),
    ("nlocal2_e5", _R1 + ["method.augment.n_local=2", "trainer.max_epochs=5"]),
    ("bs128", _R1 + ["trainer.batch_size=128"]),
    ("depth12_e2", _R1 + ["backbone=vit_tiny", "trainer.max_epochs=2"]),
    ("freeze1", _R1 + ["method.schedules.freeze_last_layer.epochs=1"]),
    ("ttemp07", _R1 + ["method.schedules.teacher_temp.value=0.07", "method.schedules.teacher_temp.warmup_epochs=1"]),
    ("nonorm", _R1 + ["method.norm_last_layer=false"]),
    ("smallhead", _R1 + ["method.hidden_dim=512", "method.bottleneck_dim=128"]),
    ("wdconst", _R1 + ["optim.weight_decay_end=0.04"]),
    ("patch4_e2", _R1 + ["backbone.patch_size=4", "method.augment.local_crop_size=16", "trainer.max_epochs=2"]),
    ("clipglobal", _R1 + ["optim.clip_mode=global"]),
    ("mom98", _R1 + ["method.schedules.teacher_momentum.base=0.98"]),
    ("bs128_seed1", _R2 + ["trainer.seed=1"]),
    ("bs64", _R2 + ["trainer.batch_size=64"]),
    ("bs128_blr5e-4", _R2 + ["optim.blr=5e-4"]),
    ("bs128_mom98", _R2 + ["method.schedules.teacher_momentum.base=0.98"]),
    ("bs128_nl2_e5", _R2 + ["method.augment.n_local=2", "trainer.max_epochs=5"]),
    ("bs64_blr5e-4", _R2 + ["trainer.batch_size=64", "optim.blr=5e-4"]),
    ("bs128_out16k", _R2 + ["method.out_dim=16384"]),
    ("bs128_mom98_blr5e-4", _R2 + ["method.schedules.teacher_momentum.base=0.98", "optim.blr=5e-4"]),
    ("bs128_e3", _R2 + ["trainer.max_epochs=3"]),
    ("bs128_nl6", _R2 + ["method.augment.n_local=6"]),
]

# Supervised pretraining on 28 px images: DeiT's ImageNet augmentation (the method's paper defaults)
# against a light one. `deit` is DeiT's (the recipe before this sweep, 5 epochs); `light` drops Mixup/CutMix,
# RandAugment, random erasing and the repeats and crops from 35-100% of the image; `light_e10` is
# `light` for 10 epochs (still within the hour); `light_crop80_e10` crops only 80-100%, since a
# crop that cuts off a sleeve can turn a shirt into a T-shirt; `light_crop80_e20` gives it twice the epochs.
# Every run spells out its augmentation and epochs, so that the table stays true whatever the recipe.
_SUP = ["method=supervised"]
_DEIT = ["method.mixup=0.8", "method.cutmix=1.0", "method.randaugment=rand-m9-mstd0.5-inc1-mmax9",
         "method.erasing=0.25", "method.repeated_aug=3", "method.augment.global_scale=[0.08,1.0]"]
_LIGHT = ["method.mixup=0", "method.cutmix=0", "method.randaugment=null", "method.erasing=0",
          "method.repeated_aug=1"]
SUPERVISED_RUNS: list[tuple[str, list[str]]] = [
    ("deit", _SUP + _DEIT + ["trainer.max_epochs=5"]),
    ("light", _SUP + _LIGHT + ["method.augment.global_scale=[0.35,1.0]", "trainer.max_epochs=5"]),
    ("light_e10", _SUP + _LIGHT + ["method.augment.global_scale=[0.35,1.0]", "trainer.max_epochs=10"]),
    ("light_crop80_e10", _SUP + _LIGHT + ["method.augment.global_scale=[0.8,1.0]", "trainer.max_epochs=10"]),
    ("light_crop80_e20", _SUP + _LIGHT + ["method.augment.global_scale=[0.8,1.0]", "trainer.max_epochs=20"]),
]
RUN_SETS = {"recipe": RUNS, "first_sweep": FIRST_SWEEP_RUNS, "supervised": SUPERVISED_RUNS}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="outputs/recipe_sweep")
    ap.add_argument("--parallel", type=int, default=1)
    ap.add_argument("--runs", choices=sorted(RUN_SETS), default="recipe")
    ap.add_argument("--only", default="", help="comma-separated run names")
    ap.add_argument("--select", default="knn/val_top1", help="the validation metric that ranks the runs")
    ap.add_argument("common", nargs="*", help="overrides added to every run (after --)")
    args = ap.parse_args()
    check_validation_metric(args.select)
    runs = RUN_SETS[args.runs]
    only = [n for n in args.only.split(",") if n]
    unknown = sorted(set(only) - {name for name, _ in runs})
    if unknown:
        ap.error(f"--only: no run named {', '.join(unknown)} in --runs {args.runs}; "
                 f"its runs: {', '.join(name for name, _ in runs)}")
    todo = [r for r in runs if not only or r[0] in only]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
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
    text = validation_table(results, args.select)
    (out / "results.md").write_text(text)
    print(text)
    return 0 if all("metrics" in r for r in results) else 1


VAL_COLUMNS = ("knn/val_top1", "linear/val_top1", "baseline/knn/val_top1", "baseline/linear/val_top1")


def check_validation_metric(metric: str) -> None:
    """Refuse to rank by anything but a validation metric: the test split is read once, at the end."""
    if "/val_" not in metric:
        raise SystemExit(f"--select={metric}: choices are made on validation; pass a metric with '/val_' "
                         f"such as knn/val_top1 or linear/val_top1")


def select_best(results: list[dict], metric: str = "knn/val_top1") -> dict:
    """The run with the highest validation `metric` (runs without metrics are skipped)."""
    check_validation_metric(metric)
    scored = [r for r in results if metric in r.get("metrics", {})]
    if not scored:
        raise ValueError(f"no run has {metric}")
    return max(scored, key=lambda r: r["metrics"][metric])


def validation_table(results: list[dict], metric: str) -> str:
    """Markdown table of the runs' validation metrics, best `metric` first; the chosen run in bold."""
    ranked = sorted(results, key=lambda r: -r.get("metrics", {}).get(metric, float("-inf")))
    best = select_best(results, metric)["name"] if any(metric in r.get("metrics", {}) for r in results) else None
    lines = ["| run | overrides | steps | kNN val | linear val | kNN val random init | linear val random init |",
             "|---" * 7 + "|"]
    for r in ranked:
        m = r.get("metrics", {})
        name = f"**{r['name']}**" if r["name"] == best else r["name"]
        lines.append(f"| {name} | {' '.join(r['overrides'])} | {int(m.get('train/steps', 0))} | "
                     + " | ".join(f"{m.get(k, float('nan')):.2f}" for k in VAL_COLUMNS) + " |")
    return "\n".join(lines) + "\n"


def _record(name: str, overrides: list[str], run_dir: Path, seconds: float) -> dict:
    rec: dict = {"name": name, "overrides": overrides, "seconds": round(seconds, 1)}
    try:
        rec["metrics"] = json.loads((run_dir / "metrics.json").read_text())["metrics"]
    except (OSError, ValueError, KeyError) as e:
        rec["error"] = f"{e!r}; see {run_dir / 'stdout.txt'}"
    return rec


if __name__ == "__main__":
    sys.exit(main())
