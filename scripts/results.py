"""`make results`: run every method's CPU recipe (with its chains) and write the results table.

    python scripts/results.py                 # every row; finished rows are skipped
    python scripts/results.py --rows dino,eva # some rows (and nothing else)
    QUICK=1 python scripts/results.py         # a few steps per run, into outputs/results-quick/
    python scripts/results.py --no-curves     # without kNN on val after every epoch (the learning curves)

Each row is one or more `pretrain` / `evaluate` runs, each in its own run directory under `--out`
(default `outputs/results`); a chained row names the rows it needs (EVA learns from the DINO row's
encoder, BEiT from a tokenizer row). Re-running resumes an interrupted run (the same command in
the same run directory resumes) and skips rows whose `row.json` says they finished, unless a row
they need finished after they started: such a row measured an older input and runs again (its old
run directory moved to `<out>/replaced/`); the table names the ones not chosen to run.

The table (`docs/results.md` between the `results:begin/end` markers, also the README's, and
`docs/results.json`) has per row: the command, epochs, wall time, training img/s, kNN / linear
test top-1 with the validation top-1 the linear probe's lr was chosen on, the same encoder at random
initialisation, and every other evaluator's headline metric (image→text R@1: retrieval's
image-text part, image-text rows only). Under it: dense evaluation (segmentation mIoU, attention
Jaccard) and fine-tuning (the epoch chosen on val) of some pretrained encoders, rows `dense_<row>`
and `finetune_<row>`. It names the CPU (model, AMX or not), torch version and commit. Test
accuracy is read once per run, at its end; nothing here chooses anything.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
BEGIN, END = "<!-- results:begin -->", "<!-- results:end -->"
EVALUATORS = "evaluator=[knn,linear,retrieval,fewshot]"
CURVES = "eval.every_n_epochs=1"  # --curves: kNN (eval.periodic's default) on the validation split after every epoch


@dataclass(frozen=True)
class Row:
    """One line of the table: `args` for `pretrain` (or `evaluate` when `entry` says so)."""

    name: str
    label: str
    args: tuple[str, ...]
    entry: str = "pretrain"
    needs: tuple[str, ...] = field(default_factory=tuple)


def rows(out: str) -> list[Row]:
    """Every row in run order (a row comes after the rows it needs)."""
    return [
        Row("pixels", "raw pixels (standardised)", ("checkpoint=pixels",), entry="evaluate"),
        Row("dino", "DINO", ("method=dino",)),
        Row("ibot", "iBOT", ("method=ibot",)),
        Row("dinov2", "DINOv2", ("method=dinov2",)),
        Row("mae", "MAE", ("method=mae",)),
        Row("supervised", "supervised (labels, light augmentation)", ("method=supervised",)),
        Row("clip", "CLIP (captions from labels)", ("method=clip", "dataset=fashion_mnist_captions")),
        Row("siglip", "SigLIP (captions from labels)", ("method=siglip", "dataset=fashion_mnist_captions")),
        Row("ijepa", "I-JEPA", ("method=ijepa",)),
        Row("vq_tokenizer", "pixel VQ tokenizer", ("method=vq_tokenizer",)),
        Row("beit", "BEiT (pixel VQ codes)", ("method=beit", f"method.tokenizer={out}/vq_tokenizer"), needs=("vq_tokenizer",)),
        Row("eva", "EVA (DINO teacher)", ("method=eva", f"method.teacher={out}/dino"), needs=("dino",)),
        Row("vqkd", "VQ-KD tokenizer (DINO teacher)", ("method=vqkd", f"method.teacher={out}/dino"), needs=("dino",)),
        Row("beit_vqkd", "BEiT v2 (VQ-KD codes)", ("method=beit", f"method.tokenizer={out}/vqkd"), needs=("vqkd",)),
        Row("distill", "distilled small ViT (DINO teacher)", ("method=distill", f"method.teacher={out}/dino"), needs=("dino",)),
        Row("dino_small", "the same small ViT, DINO from scratch", ("experiment=dino_fashion_mnist_small_student",)),
        # a third more steps than the distilled student: from-scratch DINO given more compute than distillation
        Row("dino_small_4ep", "the same small ViT, DINO from scratch, 4 epochs",
            ("experiment=dino_fashion_mnist_small_student", "trainer.max_epochs=4")),
        *dense_rows(out),
        *finetune_rows(out),
    ]


DENSE_SOURCES = ("dino", "ibot", "dinov2", "mae", "supervised")
DENSE_EVAL = ("dataset=fashion_mnist_segmentation", "evaluator=[segmentation,attention_jaccard]",
              "evaluator.segmentation.max_train_images=10000", "evaluator.segmentation.max_eval_images=2000",
              "evaluator.attention_jaccard.max_images=2000")


def dense_rows(out: str) -> list[Row]:
    """Linear segmentation and attention Jaccard on the Fashion-MNIST foreground set: the random-init
    encoder, then each pretrained encoder that has [CLS] attention (rows `dense_<source>`)."""
    return [Row("dense_random", "random init", ("checkpoint=random", *DENSE_EVAL), entry="evaluate"),
            *(Row(f"dense_{src}", src, (f"checkpoint={out}/{src}", *DENSE_EVAL), entry="evaluate", needs=(src,))
              for src in DENSE_SOURCES)]


# the fine-tuning recipe for 28 px images chosen on val (conf/evaluator/finetune_fashion_mnist.yaml)
FINETUNE = "evaluator=[finetune_fashion_mnist]"
FINETUNE_SOURCES = ("dino", "mae")


def finetune_rows(out: str) -> list[Row]:
    """Full fine-tuning, the epoch chosen on val: the random-init encoder (what pretraining must beat),
    then pretrained encoders (rows `finetune_<source>`)."""
    return [Row("finetune_random", "random init", ("checkpoint=random", FINETUNE), entry="evaluate"),
            *(Row(f"finetune_{src}", src, (f"checkpoint={out}/{src}", FINETUNE), entry="evaluate", needs=(src,))
              for src in FINETUNE_SOURCES)]


def table_of(name: str) -> str:
    """The table a row goes to: `dense` and `finetune` rows (named by that prefix) run their own
    evaluators and have their own columns; every other row is in the main table."""
    return next((t for t in ("dense", "finetune") if name.startswith(f"{t}_")), "main")


def machine() -> dict[str, str]:
    """CPU model, AMX or not, torch version, commit: the context every number needs."""
    import torch

    cpu = platform.processor() or platform.machine()
    amx = False
    try:
        info = Path("/proc/cpuinfo").read_text()
        cpu = re.search(r"model name\s*:\s*(.+)", info).group(1).strip()  # type: ignore[union-attr]
        amx = " amx_bf16" in info or " amx_tile" in info
    except (OSError, AttributeError):
        pass
    commit = _commit()
    return {"cpu": cpu, "amx": "yes" if amx else "no", "cores": str(os.cpu_count()), "torch": torch.__version__,
            "commit": commit or "unknown", "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"}


def _cpu() -> str:
    info = machine()
    return f"{info['cpu']} (AMX: {info['amx']})"


def _commit() -> str:
    return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()


def command(row: Row, run_dir: Path, quick: bool, curves: bool = False) -> list[str]:
    """The exact command line of a row (printed in the table without the run-directory override);
    `curves`: a pretrain row also evaluates kNN on the validation split after every epoch."""
    kind = table_of(row.name)
    if quick and kind == "main":  # the pipeline end to end in about a minute a row: 5 steps, kNN only, no baseline
        args = [*row.args, "evaluator=[knn]", *(["trainer.max_steps=5", "eval.baseline=false"] if row.entry == "pretrain" else [])]
    elif quick and kind == "finetune":  # one epoch instead of the recipe's ten
        args = [*row.args, "evaluator.finetune.epochs=1"]
    else:
        args = [*row.args] if kind != "main" else [*row.args, EVALUATORS]
    if curves and row.entry == "pretrain":
        args.append(CURVES)
    args.append("trainer.progress=false")
    return [sys.executable, "-m", f"vfm.{row.entry}", *args, f"hydra.run.dir={run_dir}"]


def plot_curve(row: Row, run_dir: Path, png: Path) -> None:
    """The row's kNN validation curve (`scripts/plot_curves.py`) as `png`, when the run wrote one."""
    if not (run_dir / "curves.json").is_file():
        return
    cmd = [sys.executable, str(ROOT / "scripts" / "plot_curves.py"), str(run_dir), "--out", str(png),
           "--title", row.label]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    # a missing plot does not fail the row: its numbers are in row.json
    print(f"[results] {row.name}: " + (f"curve in {png}" if proc.returncode == 0 else f"no curve: {proc.stderr.strip()}"),
          flush=True)


def stale_inputs(row: Row, out: Path) -> list[str]:
    """The rows `row` needs that finished after `row` started: its numbers are of an older input."""
    started = _record(out, row.name).get("started")
    if started is None:  # not run, or a record from before rows were timed
        return []
    return [n for n in row.needs if _record(out, n).get("ended", 0) > started]


def run_row(row: Row, out: Path, quick: bool, done: dict[str, bool], curves: bool = False) -> dict[str, Any]:
    """Run `row` unless it finished after the rows it needs; return its record (metrics, seconds, command)."""
    run_dir = out / row.name
    previous, changed = _record(out, row.name), stale_inputs(row, out)
    if previous.get("finished") and not changed:
        return previous
    missing = [n for n in row.needs if not done.get(n)]
    if missing:
        return {"name": row.name, "finished": False, "error": f"needs row(s) {', '.join(missing)}"}
    if changed:  # a fresh run, not a resume of the old one's checkpoints; the old one is kept
        aside = out / "replaced" / f"{row.name}-{previous.get('commit', 'unknown')}-{int(previous['started'])}"
        print(f"[results] {row.name}: {', '.join(changed)} finished after it ran; running it again "
              f"(the old run moves to {aside})", flush=True)
        aside.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(str(run_dir), str(aside))
    run_dir.mkdir(parents=True, exist_ok=True)
    cmd = command(row, run_dir, quick, curves)
    print(f"[results] {row.name}: {' '.join(cmd[2:])}", flush=True)
    t0, commit = time.time(), _commit()  # the code the row runs, whatever lands while it runs
    with open(run_dir / "stdout.txt", "a") as log:
        rc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT).returncode
    # what the table shows: the row's arguments, the evaluation during training (its wall time includes
    # it) and QUICK's few steps; not the evaluators every main row runs, the progress flag or the run dir
    shown = [row.entry, *(a for a in cmd[3:-1] if a not in (EVALUATORS, "trainer.progress=false"))]
    ended = time.time()
    record: dict[str, Any] = {"name": row.name, "seconds": round(ended - t0, 1), "returncode": rc,
                              "command": " ".join(shown), "commit": commit, "started": t0, "ended": ended}
    try:
        record["metrics"] = json.loads((run_dir / "metrics.json").read_text())["metrics"]
        record["finished"] = rc == 0
    except (OSError, ValueError, KeyError) as e:
        record.update(finished=False, error=f"{e!r}; see {run_dir / 'stdout.txt'}")
    from vfm.io import atomic_write_json  # after the runs: this script must not need vfm to start

    atomic_write_json(run_dir / "row.json", record)
    return record


def _cell(m: dict[str, Any], key: str, fmt: str = "{:.2f}") -> str:
    v = m.get(key)
    return fmt.format(v) if isinstance(v, (int, float)) else "–"


def _epochs(m: dict[str, Any]) -> str:
    """Whole epochs; a run shorter than one epoch (QUICK's few steps) by its steps."""
    epochs, steps = m.get("train/epochs"), m.get("train/steps")
    if isinstance(epochs, (int, float)) and epochs < 1 and isinstance(steps, int) and steps > 0:
        return f"{steps} steps"
    return _cell(m, "train/epochs", "{:.0f}")


def _wall(rec: dict[str, Any]) -> str:
    minutes, seconds = divmod(int(rec["seconds"]), 60)
    return f"{minutes} min {seconds:02d} s"


def table(labels: dict[str, str], records: list[dict[str, Any]], info: dict[str, str]) -> str:
    """The markdown table of every row (rows not run say so)."""
    lines = [
        f"Fashion-MNIST, top-1 % on the test split (val: the validation split the linear probe's lr was chosen on). "
        f"CPU: {info['cpu']} ({info['cores']} cores, AMX: {info['amx']}), GPU: {info['gpu']}, torch {info['torch']}, "
        f"commit {info['commit']}. Generated by `make results`. Image→text R@1: the image's own caption ranked first "
        f"among the distinct test captions (docs/evaluation.md; with 10 templates drawn independently of the image, at "
        f"most about 10%).",
        "",
        "| row | command | epochs | wall time | img/s | kNN | linear (val) | random init kNN / linear | retrieval mAP | 5-shot "
        "| zero-shot | image→text R@1 |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for rec in records:
        if table_of(rec["name"]) != "main":
            continue
        m = rec.get("metrics") or {}
        if not rec.get("finished"):
            lines.append(f"| {labels[rec['name']]} | not run: {rec.get('error', 'not finished')} |" + " |" * 10)
            continue
        lines.append(
            f"| {labels[rec['name']]} | `{rec['command']}` | {_epochs(m)} | {_wall(rec)} "
            f"| {_cell(m, 'train/images_per_s', '{:.0f}')} | {_cell(m, 'knn/top1')} "
            f"| {_cell(m, 'linear/top1')} ({_cell(m, 'linear/val_top1')}) "
            f"| {_cell(m, 'baseline/knn/top1')} / {_cell(m, 'baseline/linear/top1')} "
            f"| {_cell(m, 'retrieval/map')} | {_cell(m, 'fewshot/5shot_top1')} | {_cell(m, 'zero_shot/top1')} "
            f"| {_cell(m, 'retrieval/i2t_r1')} |"
        )
    lines += _pixels_note(labels, records)
    lines += _commits_note(records, info["commit"])
    lines += _stale_note(records)
    lines += _cpus_note(records, f"{info['cpu']} (AMX: {info['amx']})")
    return "\n".join(lines) + "\n" + dense_table(labels, records) + finetune_table(labels, records)


# the image-only self-supervised rows (the tokenizers are steps of a chain, not encoders to compare)
SELF_SUPERVISED = ("dino", "ibot", "dinov2", "mae", "ijepa", "beit", "eva", "beit_vqkd", "distill", "dino_small",
                   "dino_small_4ep")


def _pixels_note(labels: dict[str, str], records: list[dict[str, Any]]) -> list[str]:
    """A line saying which self-supervised rows beat the raw pixels' linear probe and which do not."""
    by_name = {r["name"]: r for r in records}
    px = by_name.get("pixels", {})
    if not px.get("finished") or "linear/top1" not in px.get("metrics", {}):
        return []
    pixels = px["metrics"]["linear/top1"]
    linear = {n: by_name[n]["metrics"]["linear/top1"] for n in SELF_SUPERVISED
              if by_name.get(n, {}).get("finished") and "linear/top1" in by_name[n].get("metrics", {})}
    ranked = sorted(linear, key=linear.get, reverse=True)

    def names(rows: list[str]) -> str:
        return "; ".join(f"{labels[n]} ({linear[n]:.2f})" for n in rows) or "none"

    return ["", f"Self-supervised rows against the raw pixels' linear probe ({pixels:.2f}). Above: "
                f"{names([n for n in ranked if linear[n] > pixels])}. Not above: "
                f"{names([n for n in ranked if linear[n] <= pixels])}."]


def _commits_note(records: list[dict[str, Any]], head: str) -> list[str]:
    """A line naming, per commit, the finished rows measured at a commit other than `head`."""
    by_commit: dict[str, list[str]] = {}
    for r in records:
        if r.get("finished") and r.get("commit") and r["commit"] != head:
            by_commit.setdefault(r["commit"], []).append(f"`{r['name']}`")
    if not by_commit:
        return []
    groups = "; ".join(f"at {c}: {', '.join(names)}" for c, names in by_commit.items())
    return ["", f"Rows measured at an earlier commit (`--rows NAME` re-runs one): {groups}."]


def _stale_note(records: list[dict[str, Any]]) -> list[str]:
    """A line naming the finished rows measured on an older version of a row they need."""
    names = [f"`{r['name']}` (on an older {', '.join(f'`{n}`' for n in r['stale_inputs'])})" for r in records
             if r.get("finished") and r.get("stale_inputs")]
    return ["", f"Rows measured on an older version of a row they need (`--rows NAME` re-runs one): "
                f"{', '.join(names)}."] if names else []


def _cpus_note(records: list[dict[str, Any]], cpu: str) -> list[str]:
    """A line naming the finished rows measured on another CPU than the one named above."""
    other = [f"`{r['name']}` on {r['cpu']}" for r in records if r.get("finished") and r.get("cpu", cpu) != cpu]
    return ["", f"Rows measured on another CPU: {', '.join(other)}."] if other else []


def dense_table(labels: dict[str, str], records: list[dict[str, Any]]) -> str:
    """Segmentation mIoU and attention Jaccard per encoder (Fashion-MNIST foreground set)."""
    lines = ["", "Dense evaluation on the Fashion-MNIST foreground set (11 classes: background + 10 garments; "
             "first 10k train / 2k val / 2k test images): linear segmentation mIoU (lr chosen on val) and DINO's "
             "attention Jaccard (60% of the [CLS] attention mass vs the foreground).", "",
             "| encoder | mIoU test (val) | pixel acc. | Jaccard, best head | Jaccard, mean over heads |", "|---|---|---|---|---|"]
    for rec in (r for r in records if table_of(r["name"]) == "dense"):
        m = rec.get("metrics") or {}
        if not rec.get("finished"):
            lines.append(f"| {labels[rec['name']]} | not run: {rec.get('error', 'not finished')} | | | |")
            continue
        lines.append(f"| {labels[rec['name']]} | {_cell(m, 'segmentation/miou')} ({_cell(m, 'segmentation/val_miou')}) "
                     f"| {_cell(m, 'segmentation/pixel_acc')} | {_cell(m, 'attention_jaccard/best_head')} "
                     f"| {_cell(m, 'attention_jaccard/mean_head')} |")
    return "\n".join(lines) + "\n"


def finetune_table(labels: dict[str, str], records: list[dict[str, Any]]) -> str:
    """Fine-tuning top-1 per encoder, next to the linear probe of the same encoder (its own row)."""
    rows = [r for r in records if table_of(r["name"]) == "finetune"]
    if not rows:
        return ""
    by_name = {r["name"]: r for r in records}
    lines = ["", "Fine-tuning (`evaluate checkpoint=<row> " + FINETUNE + "`: the encoder and a linear head trained "
             "end to end with the recipe chosen on val, conf/evaluator/finetune_fashion_mnist.yaml; the epoch chosen "
             "on val, test read once for it), next to the linear probe of the same encoder.", "",
             "| encoder | wall time | fine-tune test (val) | epoch chosen on val | linear probe test (val) |",
             "|---|---|---|---|---|"]
    for rec in rows:
        m = rec.get("metrics") or {}
        if not rec.get("finished"):
            lines.append(f"| {labels[rec['name']]} | not run: {rec.get('error', 'not finished')} | | | |")
            continue
        src = by_name.get(rec["name"].removeprefix("finetune_"), {}).get("metrics") or {}
        linear = f"{_cell(src, 'linear/top1')} ({_cell(src, 'linear/val_top1')})" if src else "–"
        lines.append(f"| {labels[rec['name']]} | {_wall(rec)} | {_cell(m, 'finetune/top1')} "
                     f"({_cell(m, 'finetune/val_top1')}) | {_cell(m, 'finetune/best_epoch', '{:.0f}')} | {linear} |")
    return "\n".join(lines) + "\n"


def replace_between_markers(path: Path, body: str) -> None:
    """Put `body` between the results markers of `path` (appended with markers if absent)."""
    text = path.read_text() if path.exists() else ""
    block = f"{BEGIN}\n{body}{END}"
    if BEGIN in text and END in text:
        text = text[: text.index(BEGIN)] + block + text[text.index(END) + len(END):]
    else:
        text = text.rstrip("\n") + "\n\n" + block + "\n"
    path.write_text(text)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line (`quick`: QUICK=1 in the environment)."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    quick = os.environ.get("QUICK", "") not in ("", "0")
    ap.add_argument("--out", default="outputs/results-quick" if quick else "outputs/results")
    ap.add_argument("--rows", default="", help="comma-separated row names (default: all)")
    ap.add_argument("--no-docs", action="store_true", help="write only under --out, not docs/ and README.md")
    ap.add_argument("--report", action="store_true", help="run nothing: write the table from the finished rows")
    # on by default: kNN on val uses no global random number, so the weights are the same without it
    ap.add_argument("--curves", action=argparse.BooleanOptionalAction, default=True,
                    help="pretrain rows also evaluate kNN on val every epoch; each row's curve goes to "
                         "docs/images/curves/<row>.png (<out>/curves/ with QUICK=1 or --no-docs)")
    args = ap.parse_args(argv)
    args.quick = quick
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    quick = args.quick
    out = Path(args.out)
    all_rows = rows(str(out))
    unknown = set(filter(None, args.rows.split(","))) - {r.name for r in all_rows}
    if unknown:
        print(f"--rows: unknown row(s) {sorted(unknown)}; choose from {[r.name for r in all_rows]}", file=sys.stderr)
        return 2
    chosen = [] if args.report else [r for r in all_rows if not args.rows or r.name in args.rows.split(",")]
    # rows not chosen still count as done when they finished before
    done = {r.name: bool(_record(out, r.name).get("finished")) for r in all_rows}
    curve_dir = out / "curves" if (quick or args.no_docs) else ROOT / "docs" / "images" / "curves"
    records = []
    for row in all_rows:
        rec = run_row(row, out, quick, done, args.curves) if row in chosen else _record(out, row.name)
        if stale := stale_inputs(row, out):  # a row not chosen to run again: the table says so
            rec["stale_inputs"] = stale
        done[row.name] = bool(rec.get("finished"))
        records.append(rec)
        if args.curves and row in chosen and rec.get("finished") and row.entry == "pretrain":
            plot_curve(row, out / row.name, curve_dir / f"{row.name}.png")
    info = machine()
    body = table({r.name: r.label for r in all_rows}, records, info)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.md").write_text(body)
    (out / "results.json").write_text(json.dumps({"machine": info, "rows": records}, indent=1))
    if not (quick or args.no_docs):
        replace_between_markers(ROOT / "docs" / "results.md", body)
        replace_between_markers(ROOT / "README.md", body)
        (ROOT / "docs" / "results.json").write_text(json.dumps({"machine": info, "rows": records}, indent=1))
    print(body)
    return 0 if all(r.get("finished") for r in records if r["name"] in {c.name for c in chosen}) else 1


def _record(out: Path, name: str) -> dict[str, Any]:
    """The row's `row.json` (what it measured, when, at which commit), or an unfinished stand-in."""
    path = out / name / "row.json"
    return json.loads(path.read_text()) if path.is_file() else {"name": name, "finished": False, "error": "not run yet"}


if __name__ == "__main__":
    sys.exit(main())
