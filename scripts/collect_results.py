"""Collect the job directories of a `pretrain -m ...` (Hydra multirun) sweep into one table and one plot.

Usage:

    python scripts/collect_results.py SWEEP_DIR [--out DIR] [--metrics knn/top1,linear/top1] [--sort METRIC]

    SWEEP_DIR       the sweep directory (Hydra's `hydra.sweep.dir`, e.g. multirun/2025-01-01/12-00-00)
    --out DIR       where to write results.md / results.csv / results.png (default: SWEEP_DIR)
    --metrics LIST  comma-separated metric names from metrics.json; `*` patterns are allowed
                    (`--metrics '*/top1'`). Default: every `*/top1` metric not starting with
                    `baseline/`, plus `train/final_loss`.
    --sort KEY      order the rows by a metric (best first: descending, ascending for `*loss*`)
                    or by a varying override (ascending). Default: the sweep's job order.

Every directory below SWEEP_DIR holding `.hydra/overrides.yaml` and/or `metrics.json` is one job
(`tb/`, `checkpoints/`, `eval/`, `features/`, `viz/` are not searched). `sweep_summary.json`, when
present, says which jobs failed, why, and where their logs are. The table has one row per job: the
overrides that vary across jobs as columns (those common to all jobs are listed once above it), the
status, the chosen metrics, and for jobs without metrics their error and log. It is written as
`results.md` (also printed), `results.csv` (raw values) and `results.png` (matplotlib, optional:
`pip install 'vfm[report]'`).

Exit status: 0 when at least one job has metrics, 1 when none has, 2 when SWEEP_DIR does not exist
(or a command-line argument is wrong).
"""

from __future__ import annotations

import argparse
import csv
import fnmatch
import json
import math
import os
import re
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

# a run directory's own sub-folders: large (checkpoints, feature caches, event files) and never hold
# another job, so walking them only costs time -- and an evaluate run under eval/ would be miscounted
SKIP_DIRS = frozenset({"tb", "checkpoints", "eval", "features", "viz"})
# "skipped": finished in an earlier invocation of the sweep and not rerun -- its metrics are on disk
DONE_STATUSES = frozenset({"completed", "skipped"})
MD_NAME, CSV_NAME, PNG_NAME = "results.md", "results.csv", "results.png"
INSTALL_HINT = "install matplotlib (pip install 'vfm[report]') for results.png"


# ----------------------------------------------------------------------------------------- reading


def _natural_key(text: str) -> list[Any]:
    """Sort "2" before "10" (Hydra numbers its job dirs 0, 1, ..., 10, ...)."""
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", text)]


def is_job_dir(path: Path) -> bool:
    return (path / ".hydra" / "overrides.yaml").is_file() or (path / "metrics.json").is_file()


def find_job_dirs(sweep_dir: Path) -> list[Path]:
    """Job directories below (or equal to) sweep_dir, in natural order of their relative paths."""
    found: list[Path] = []
    for root, dirs, _files in os.walk(sweep_dir):  # followlinks=False: a "latest" link would double-count
        here = Path(root)
        if is_job_dir(here):
            found.append(here)
            dirs[:] = []  # a job's sub-folders are its artefacts, not more jobs
            continue
        # hidden folders (.hydra, .submitit, ...) hold no jobs; sorted() makes the walk deterministic
        dirs[:] = sorted(d for d in dirs if d not in SKIP_DIRS and not d.startswith("."))
    return sorted(found, key=lambda p: _natural_key(p.relative_to(sweep_dir).as_posix()))


def _read_overrides(job_dir: Path) -> list[str] | None:
    path = job_dir / ".hydra" / "overrides.yaml"
    if not path.is_file():
        return None
    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError):
        return None
    return [str(o) for o in data] if isinstance(data, list) else None


def _read_summary(sweep_dir: Path) -> list[dict[str, Any]]:
    """sweep_summary.json's jobs; an absent or unreadable summary just means "no extra information"."""
    path = sweep_dir / "sweep_summary.json"
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return []
    jobs = data.get("jobs") if isinstance(data, dict) else None
    return [j for j in jobs if isinstance(j, dict)] if isinstance(jobs, list) else []


def _read_metrics(job_dir: Path) -> tuple[dict[str, Any] | None, str | None]:
    """(metrics, error): metrics.json's "metrics" dict, or None and why it could not be read."""
    path = job_dir / "metrics.json"
    if not path.is_file():
        return None, None
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        return None, f"unreadable metrics.json: {e}"
    if isinstance(data, dict) and isinstance(data.get("metrics"), dict):
        return data["metrics"], None
    return None, "metrics.json has no 'metrics' dict"


def _find_log(job_dir: Path) -> str | None:
    """Hydra writes <job name>.log into the job dir; the first one is the log worth pointing at."""
    logs = sorted(job_dir.glob("*.log")) if job_dir.is_dir() else []
    return str(logs[0]) if logs else None


def _summary_dir_candidates(entry_dir: str, sweep_dir: Path) -> Iterator[Path]:
    # "dir" is relative to the cwd the sweep ran in, which need not be ours: also try it relative
    # to the sweep dir, and its last component (Hydra's job subdir) inside the sweep dir
    p = Path(entry_dir)
    yield p
    if not p.is_absolute():
        yield sweep_dir / p
    yield sweep_dir / p.name


def _resolve(path: Path) -> Path:
    try:
        return path.resolve()
    except OSError:
        return path.absolute()


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _choose_metrics(records: list[dict[str, Any]], metrics: list[str] | None) -> list[str]:
    available: list[str] = []  # in order of first appearance (metrics.json keeps the evaluators' order)
    for rec in records:
        for key in rec["all_metrics"] or {}:
            if key not in available:
                available.append(key)
    if metrics is None:
        chosen = [k for k in available if k.endswith("/top1") and not k.startswith("baseline/")]
        if "train/final_loss" in available:
            chosen.append("train/final_loss")
        if not chosen:  # e.g. a tokenizer sweep without evaluators: show what there is instead of nothing
            chosen = [k for k in available if not k.startswith("baseline/")
                      and any(_is_number(r["all_metrics"].get(k)) for r in records if r["all_metrics"])]
        return chosen
    chosen = []
    for name in metrics:
        # a pattern expands to the metrics it matches; a plain name is kept even when no job has it,
        # so an asked-for column shows up (blank) rather than silently disappearing
        matches = [k for k in available if fnmatch.fnmatchcase(k, name)] if any(c in name for c in "*?[") else [name]
        chosen.extend(m for m in matches if m not in chosen)
    return chosen


def collect(sweep_dir: Path, metrics: list[str] | None = None) -> list[dict[str, Any]]:
    """One record per job of the sweep under sweep_dir, in sweep order.

    Each record has: "dir" (Path), "name" (the dir relative to sweep_dir, or as the summary gave it),
    "overrides" (list of override strings), "status" ("completed", "failed" or "incomplete"),
    "metrics" (the chosen metrics -> value or None, same keys in the same order in every record),
    "all_metrics" (metrics.json's dict, or None), "error" and "log" (str or None).
    `metrics` as for --metrics (names or patterns); None chooses the default columns.
    """
    sweep_dir = Path(sweep_dir)
    discovered = find_job_dirs(sweep_dir)
    by_path = {_resolve(d): d for d in discovered}
    # (job dir or None, summary entry or None)
    pairs: list[tuple[Path | None, dict[str, Any] | None]] = []
    matched: set[Path] = set()
    for entry in _read_summary(sweep_dir):
        job_dir = None
        if isinstance(entry.get("dir"), str):
            for cand in _summary_dir_candidates(entry["dir"], sweep_dir):
                r = _resolve(cand)
                if r in by_path and r not in matched:
                    job_dir = by_path[r]
                    break
                if r not in by_path and is_job_dir(cand):  # listed by the summary but outside sweep_dir
                    job_dir = cand
                    break
        if job_dir is not None:
            matched.add(_resolve(job_dir))
        pairs.append((job_dir, entry))
    # last resort for entries whose dir did not resolve: the job dir with the same overrides
    for i, (job_dir, entry) in enumerate(pairs):
        if job_dir is None and entry is not None and isinstance(entry.get("overrides"), list):
            want = sorted(map(str, entry["overrides"]))
            for d in discovered:
                if _resolve(d) not in matched and sorted(_read_overrides(d) or []) == want:
                    pairs[i] = (d, entry)
                    matched.add(_resolve(d))
                    break
    pairs += [(d, None) for d in discovered if _resolve(d) not in matched]
    # sweep order: Hydra numbers job dirs in the order it launches them, so the dirs' natural order is
    # the sweep's even when the summary lists only some jobs; summary jobs without a dir go last
    rank = {_resolve(d): i for i, d in enumerate(discovered)}
    pairs.sort(key=lambda p: rank.get(_resolve(p[0]), len(rank)) if p[0] is not None else len(rank))

    records = []
    for job_dir, entry in pairs:
        entry = entry or {}
        all_metrics, error = _read_metrics(job_dir) if job_dir is not None else (None, None)
        overrides = _read_overrides(job_dir) if job_dir is not None else None
        if overrides is None:
            overrides = [str(o) for o in entry.get("overrides") or []]
        summary_status = entry.get("status")
        if all_metrics is not None:
            status = "completed"
        elif summary_status == "failed":
            status = "failed"
        else:  # still running, killed without a trace, or the summary says done but metrics.json is gone
            status = "incomplete"
        if all_metrics is None:
            error = entry.get("error") or error
            if summary_status in DONE_STATUSES and not error:
                error = f"sweep_summary.json says {summary_status} but there is no metrics.json"
        if job_dir is not None:
            name = "." if _resolve(job_dir) == _resolve(sweep_dir) else _rel(job_dir, sweep_dir)
        else:
            name = str(entry.get("dir") or "?")
        records.append({
            "dir": job_dir if job_dir is not None else Path(str(entry.get("dir") or "")),
            "name": name,
            "overrides": overrides,
            "status": status,
            "all_metrics": all_metrics,
            "error": str(error).strip().splitlines()[0] if error else None,
            "log": entry.get("log") or (_find_log(job_dir) if job_dir is not None else None),
        })
    chosen = _choose_metrics(records, metrics)
    for rec in records:
        src = rec["all_metrics"] or {}
        rec["metrics"] = {k: src.get(k) for k in chosen}
    return records


def _rel(path: Path, base: Path) -> str:
    try:
        return path.relative_to(base).as_posix()
    except ValueError:
        return str(path)


# ----------------------------------------------------------------------------------------- the table


def parse_override(override: str) -> tuple[str, str]:
    """"optim.blr=1e-3" -> ("optim.blr", "1e-3"); "+a.b=1" -> ("a.b", "1"); "~a.b" -> ("~a.b", "")."""
    key, sep, value = override.partition("=")
    # "+key" (add) and "++key" (force-add) set the same config key as "key": one column for all three
    return (key.lstrip("+"), value) if sep else (key, "")


def split_overrides(jobs: list[dict[str, Any]]) -> tuple[list[str], list[str]]:
    """(fixed overrides, varying keys): an override every job has with the same value is "fixed";
    a key missing from some jobs or with different values "varies"."""
    per_job = [dict(parse_override(o) for o in job["overrides"]) for job in jobs]
    keys: list[str] = []
    for d in per_job:
        keys.extend(k for k in d if k not in keys)
    fixed, varying = [], []
    for key in keys:
        values = [d.get(key) for d in per_job]
        if len(jobs) > 1 and (None in values or len(set(values)) > 1):
            varying.append(key)
        else:
            fixed.append(f"{key}={values[0]}" if values[0] != "" else key)
    return fixed, varying


def override_value(job: dict[str, Any], key: str) -> str | None:
    return dict(parse_override(o) for o in job["overrides"]).get(key)


def job_label(job: dict[str, Any], varying: list[str]) -> str:
    """What tells this job apart: its varying overrides, or its dir when none vary."""
    parts = [f"{k}={v}" for k in varying if (v := override_value(job, k)) is not None]
    return ", ".join(parts) or job["name"]


def _shorten(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 1] + "\u2026"


def format_value(value: Any) -> str:
    if value is None:
        return ""
    if _is_number(value) and isinstance(value, float):
        return f"{value:.2f}"
    return str(value)  # ints (train/steps) stay whole; strings as they are


def _has_problem_column(jobs: list[dict[str, Any]]) -> bool:
    return any(j["status"] != "completed" and (j["error"] or j["log"]) for j in jobs)


def _md_cell(text: str) -> str:
    # a "|" inside a cell would end it; newlines would end the row
    return text.replace("|", "\\|").replace("\n", " ")


def to_markdown(jobs: list[dict[str, Any]], sweep_dir: Path, fixed: list[str], varying: list[str]) -> str:
    metrics = list(jobs[0]["metrics"]) if jobs else []
    header = [*varying, "status", *metrics]
    problems = _has_problem_column(jobs)
    if problems:
        header.append("error / log")
    rows = []
    for job in jobs:
        row = [override_value(job, k) or "" for k in varying] + [job["status"]]
        row += [format_value(job["metrics"][m]) for m in metrics]
        if problems:
            note = ""
            if job["status"] != "completed":
                note = " ".join(filter(None, [job["error"], f"(log: `{job['log']}`)" if job["log"] else None]))
            row.append(note)
        rows.append(row)
    if not varying:  # one job, or jobs that differ in nothing: the dir is what tells rows apart
        header.insert(0, "job")
        for row, job in zip(rows, jobs):
            row.insert(0, job["name"])
    lines = [f"# Results: {sweep_dir}", ""]
    lines.append("fixed: " + (", ".join(f"`{o}`" for o in fixed) if fixed else "(none)"))
    lines.append("")
    lines.append("| " + " | ".join(_md_cell(h) for h in header) + " |")
    lines.append("|" + "|".join("---" for _ in header) + "|")
    lines += ["| " + " | ".join(_md_cell(c) for c in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def write_csv(jobs: list[dict[str, Any]], varying: list[str], path: Path) -> None:
    """The table's columns with raw values; error and log as two columns, plus the job dir."""
    metrics = list(jobs[0]["metrics"]) if jobs else []
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow([*varying, "status", *metrics, "error", "log", "dir"])
        for job in jobs:
            writer.writerow([
                *(override_value(job, k) or "" for k in varying), job["status"],
                *("" if job["metrics"][m] is None else job["metrics"][m] for m in metrics),
                job["error"] or "", job["log"] or "", job["name"],
            ])


def _as_float(text: str | None) -> float | None:
    if text is None or text.strip().lower() in ("nan", "inf", "-inf", "+inf", "infinity"):
        return None
    try:
        return float(text)
    except ValueError:
        return None


def numeric_axis(jobs: list[dict[str, Any]], varying: list[str]) -> tuple[str, list[float], bool] | None:
    """(key, x per job, log scale) when exactly one override varies and every job's value is a number
    -- the sweep is then a curve, not a set of unrelated runs; None otherwise."""
    if len(varying) != 1:
        return None
    xs = [_as_float(override_value(job, varying[0])) for job in jobs]
    if any(x is None for x in xs):
        return None
    xs_f = [float(x) for x in xs if x is not None]
    positive = min(xs_f) > 0
    # a learning-rate or weight-decay sweep spans decades: on a linear axis all but the last points
    # would crowd at the left edge
    log = positive and max(xs_f) / min(xs_f) > 10
    return varying[0], xs_f, log


def sort_jobs(jobs: list[dict[str, Any]], key: str, varying: list[str]) -> list[dict[str, Any]]:
    """Sort by a metric (best first; jobs without it last) or by a varying override (ascending)."""
    if jobs and key in jobs[0]["metrics"]:
        # "best first": higher accuracy is better, lower loss is better
        sign = 1.0 if "loss" in key else -1.0
        def mkey(job: dict[str, Any]) -> tuple[int, float]:
            v = job["metrics"][key]
            ok = _is_number(v) and not math.isnan(v)
            return (0, sign * v) if ok else (1, 0.0)
        return sorted(jobs, key=mkey)
    if key in varying:
        values = [override_value(j, key) for j in jobs]
        if all(_as_float(v) is not None for v in values):
            return sorted(jobs, key=lambda j: _as_float(override_value(j, key)) or 0.0)
        return sorted(jobs, key=lambda j: _natural_key(override_value(j, key) or ""))
    raise KeyError(key)


# ------------------------------------------------------------------------------------------- the plot


def write_plot(jobs: list[dict[str, Any]], varying: list[str], path: Path, title: str) -> str | None:
    """results.png: "line" (one numeric override varies) or "bar"; None when matplotlib is missing."""
    try:  # lazily: matplotlib is an optional extra, the table is useful without it
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        return None
    metrics = list(jobs[0]["metrics"]) if jobs else []
    axis = numeric_axis(jobs, varying)
    # Figure + FigureCanvasAgg rather than pyplot: no global backend switch, no figure registry to leak
    if axis is not None and metrics:
        key, xs, log = axis
        fig = Figure(figsize=(6.4, 1.2 + 2.2 * len(metrics)), layout="constrained")
        axes = fig.subplots(len(metrics), 1, sharex=True, squeeze=False)[:, 0]
        order = sorted(range(len(jobs)), key=lambda i: xs[i])
        for ax, m in zip(axes, metrics):
            # one panel per metric: accuracies (~80) and losses (~5) on one y-axis would flatten both
            # NaN where a job has no value: matplotlib breaks the line there instead of bridging the gap
            ys = [float(v) if _is_number(v := jobs[i]["metrics"][m]) else math.nan for i in order]
            ax.plot([xs[i] for i in order], ys, marker="o")
            for i in order:  # jobs without metrics: a marked gap, so a missing point is not mistaken for none run
                if jobs[i]["status"] != "completed":
                    ax.axvline(xs[i], color="tab:red", linestyle=":", linewidth=1)
                    ax.text(xs[i], 0.97, jobs[i]["status"], transform=ax.get_xaxis_transform(), rotation=90,
                            ha="right", va="top", color="tab:red", fontsize=8)
            ax.set_ylabel(m)
            ax.grid(alpha=0.3)
        last = axes[-1]
        if log:
            last.set_xscale("log")
        ticks = sorted(set(xs))
        tick_labels = {x: override_value(jobs[xs.index(x)], key) or str(x) for x in ticks}
        last.set_xticks(ticks, [tick_labels[x] for x in ticks])
        last.minorticks_off()
        last.set_xlabel(key)
        kind = "line"
    else:
        # the table has the full label; on the axis a long one would squeeze the plot away
        labels = [_shorten(job_label(j, varying), 60) for j in jobs]
        longest = max(map(len, labels), default=0)
        long = len(jobs) > 6 or longest > 12
        n, k = len(jobs), max(len(metrics), 1)
        width = 0.8 / k
        # rotated tick labels take height: ~0.05 in per character at 8 pt and 45 degrees
        height = 4.8 + (0.05 * longest if long else 0.0)
        fig = Figure(figsize=(min(40.0, max(6.4, 1.5 + 0.3 * n * k)), height), layout="constrained")
        ax = fig.subplots()
        for mi, m in enumerate(metrics):
            xs_bar, heights = [], []
            for j, job in enumerate(jobs):
                v = job["metrics"][m]
                if _is_number(v) and math.isfinite(v):
                    xs_bar.append(j + (mi - (k - 1) / 2) * width)
                    heights.append(v)
            bars = ax.bar(xs_bar, heights, width, label=m)
            if n * k <= 40:  # values on the bars, unless they would be an unreadable crowd
                ax.bar_label(bars, fmt="%.2f", fontsize=7, rotation=90, padding=2)
        for j, job in enumerate(jobs):
            if job["status"] != "completed":
                ax.axvspan(j - 0.4, j + 0.4, color="tab:red", alpha=0.08)
                ax.text(j, 0.03, job["status"], transform=ax.get_xaxis_transform(), ha="center", va="bottom",
                        rotation=90, color="tab:red", fontsize=9)
        ax.set_xticks(range(n), labels, rotation=45 if long else 0, ha="right" if long else "center",
                      rotation_mode="anchor" if long else "default", fontsize=8)
        ax.set_xlim(-0.6, n - 0.4)
        ax.margins(y=0.15)  # room for the value labels above the tallest bar
        if metrics:
            ax.legend(fontsize=8)
        ax.grid(axis="y", alpha=0.3)
        kind = "bar"
    fig.suptitle(title)
    FigureCanvasAgg(fig)
    fig.savefig(path, dpi=120)
    return kind


# ---------------------------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("sweep_dir", type=Path, metavar="SWEEP_DIR")
    parser.add_argument("--out", type=Path, default=None, help="output directory (default: SWEEP_DIR)")
    parser.add_argument("--metrics", default=None,
                        help="comma-separated metric names or patterns (default: */top1 without baseline/, "
                             "and train/final_loss)")
    parser.add_argument("--sort", default=None, metavar="KEY",
                        help="sort rows by this metric (best first) or varying override")
    args = parser.parse_args(argv)

    sweep_dir: Path = args.sweep_dir
    if not sweep_dir.is_dir():
        print(f"error: sweep dir {sweep_dir} does not exist (or is not a directory)", file=sys.stderr)
        return 2
    metrics = [m.strip() for m in args.metrics.split(",") if m.strip()] if args.metrics else None
    jobs = collect(sweep_dir, metrics)
    if not any(j["status"] == "completed" for j in jobs):
        counts = {s: sum(j["status"] == s for j in jobs) for s in dict.fromkeys(j["status"] for j in jobs)}
        found = ", ".join(f"{c} {s}" for s, c in counts.items()) or "no job directories"
        print(f"no finished jobs under {sweep_dir} (no job dir has a metrics.json; found {found})", file=sys.stderr)
        for job in jobs:
            extra = "; ".join(filter(None, [job["error"], job["log"] and f"log: {job['log']}"]))
            print(f"  {job['name']}: {job['status']}" + (f" ({extra})" if extra else ""), file=sys.stderr)
        return 1

    fixed, varying = split_overrides(jobs)
    if args.sort:
        try:
            jobs = sort_jobs(jobs, args.sort, varying)
        except KeyError:
            print(f"error: --sort {args.sort} is neither a metric column ({', '.join(jobs[0]['metrics'])}) "
                  f"nor a varying override ({', '.join(varying) or 'none'})", file=sys.stderr)
            return 2
    out = args.out if args.out is not None else sweep_dir
    out.mkdir(parents=True, exist_ok=True)
    md = to_markdown(jobs, sweep_dir, fixed, varying)
    (out / MD_NAME).write_text(md)
    write_csv(jobs, varying, out / CSV_NAME)
    kind = write_plot(jobs, varying, out / PNG_NAME, title=_resolve(sweep_dir).name)

    print(md)
    print(f"wrote {out / MD_NAME}")
    print(f"wrote {out / CSV_NAME}")
    if kind is None:
        print(INSTALL_HINT)
    elif kind == "line":
        key, _, log = numeric_axis(jobs, varying) or ("", [], False)
        print(f"wrote {out / PNG_NAME} (line plot against {key}{', log x-axis' if log else ''})")
    else:
        print(f"wrote {out / PNG_NAME} (bar chart, one group per job)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
