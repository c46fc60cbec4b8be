"""scripts/collect_results.py on synthetic sweep directories (no training: the job dirs are written here)."""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

import pytest
from script_loader import load_script


@pytest.fixture(scope="module")
def cr():
    yield from load_script("collect_results")


def make_job(job_dir: Path, overrides: list[str], metrics: dict | None = None) -> Path:
    """A job dir as `pretrain -m` leaves it: .hydra/overrides.yaml, and metrics.json once finished."""
    (job_dir / ".hydra").mkdir(parents=True)
    (job_dir / ".hydra" / "overrides.yaml").write_text("".join(f"- {o}\n" for o in overrides))
    if metrics is not None:
        (job_dir / "metrics.json").write_text(json.dumps({"metrics": metrics, "lr_rule": "blr * bs / 256"}))
    return job_dir


def metrics(knn: float, linear: float, loss: float) -> dict:
    return {"knn/top1": knn, "linear/top1": linear, "baseline/knn/top1": 70.7, "baseline/linear/top1": 74.4,
            "train/final_loss": loss, "train/steps": 2340, "train/images_per_s": 620.0, "train/seconds": 300.0}


def md_rows(md: str) -> list[list[str]]:
    """The Markdown table's body rows as cells (header and separator dropped)."""
    lines = [line for line in md.splitlines() if line.startswith("|")]
    return [[c.strip() for c in line.strip("|").split(" | ")] for line in lines[2:]]


@pytest.fixture
def three_jobs(tmp_path: Path) -> Path:
    """Two completed jobs and one failed one (its dir has no metrics.json; the summary says why)."""
    sweep = tmp_path / "sweep_methods"
    common = ["optim.blr=0.001", "trainer.max_epochs=3"]
    make_job(sweep / "0", ["method=dino", *common], metrics(76.9, 80.3, 5.1))
    make_job(sweep / "1", ["method=ibot", *common], metrics(75.456, 79.0, 4.2))
    make_job(sweep / "2", ["method=mae", *common])
    (sweep / "multirun.yaml").write_text("hydra: {}\n")
    log = str(sweep / "2" / "pretrain.log")
    summary = {"task": "pretrain", "jobs": [
        {"overrides": ["method=dino", *common], "dir": str(sweep / "0"), "status": "completed", "error": None,
         "log": None},
        {"overrides": ["method=ibot", *common], "dir": str(sweep / "1"), "status": "skipped", "error": None,
         "log": None},
        {"overrides": ["method=mae", *common], "dir": str(sweep / "2"), "status": "failed",
         "error": "RuntimeError: CUDA out of memory", "log": log},
    ]}
    (sweep / "sweep_summary.json").write_text(json.dumps(summary))
    return sweep


def test_three_job_sweep_writes_md_csv_png(cr, three_jobs: Path, capsys) -> None:
    assert cr.main([str(three_jobs)]) == 0
    stdout = capsys.readouterr().out
    md = (three_jobs / "results.md").read_text()
    assert md in stdout  # the table is printed as well as written
    for name in ("results.md", "results.csv", "results.png"):
        assert str(three_jobs / name) in stdout

    assert "fixed: `optim.blr=0.001`, `trainer.max_epochs=3`" in md
    header = next(line for line in md.splitlines() if line.startswith("|"))
    assert header == "| method | status | knn/top1 | linear/top1 | train/final_loss | error / log |"
    rows = md_rows(md)
    assert rows[0][:5] == ["dino", "completed", "76.90", "80.30", "5.10"]
    assert rows[1][:5] == ["ibot", "completed", "75.46", "79.00", "4.20"]  # "skipped" = done earlier
    assert rows[2][:5] == ["mae", "failed", "", "", ""]
    assert "RuntimeError: CUDA out of memory" in rows[2][5] and str(three_jobs / "2" / "pretrain.log") in rows[2][5]
    assert "baseline/" not in md

    with (three_jobs / "results.csv").open(newline="") as f:
        csv_rows = list(csv.DictReader(f))
    assert [(r["method"], r["status"]) for r in csv_rows] == [(r[0], r[1]) for r in rows]
    assert float(csv_rows[1]["knn/top1"]) == 75.456  # raw, not rounded
    assert csv_rows[2]["knn/top1"] == "" and csv_rows[2]["error"] == "RuntimeError: CUDA out of memory"
    assert csv_rows[2]["log"].endswith("pretrain.log")

    png = (three_jobs / "results.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    from PIL import Image
    with Image.open(three_jobs / "results.png") as im:
        assert im.size[0] > 0 and im.size[1] > 0
    assert "bar chart" in stdout  # method is not numeric


def test_numeric_single_override_takes_line_plot(cr, tmp_path: Path, capsys) -> None:
    sweep = tmp_path / "blr"
    for i, blr in enumerate(["1e-4", "1e-3", "1e-2"]):
        make_job(sweep / str(i), ["method=dino", f"optim.blr={blr}"], metrics(70 + i, 75 + i, 5.0 - i))
    make_job(sweep / "3", ["method=dino", "optim.blr=1e-1"])  # incomplete: a gap on the curve
    jobs = cr.collect(sweep)
    fixed, varying = cr.split_overrides(jobs)
    assert (fixed, varying) == (["method=dino"], ["optim.blr"])
    assert cr.numeric_axis(jobs, varying) == ("optim.blr", [1e-4, 1e-3, 1e-2, 1e-1], True)
    assert cr.write_plot(jobs, varying, tmp_path / "p.png", "blr") == "line"

    assert cr.main([str(sweep), "--out", str(tmp_path / "out")]) == 0
    stdout = capsys.readouterr().out
    assert "line plot against optim.blr, log x-axis" in stdout
    assert (tmp_path / "out" / "results.png").is_file() and not (sweep / "results.md").exists()
    assert md_rows((tmp_path / "out" / "results.md").read_text())[3][:2] == ["1e-1", "incomplete"]


def test_two_varying_overrides_take_bar_chart(cr, tmp_path: Path) -> None:
    sweep = tmp_path / "grid"
    make_job(sweep / "0", ["optim.blr=1e-3", "trainer.batch_size=64"], metrics(70, 75, 5))
    make_job(sweep / "1", ["optim.blr=2e-3", "trainer.batch_size=128"], metrics(71, 76, 4))
    jobs = cr.collect(sweep)
    _, varying = cr.split_overrides(jobs)
    assert cr.numeric_axis(jobs, varying) is None
    assert cr.job_label(jobs[1], varying) == "optim.blr=2e-3, trainer.batch_size=128"
    assert cr.write_plot(jobs, varying, tmp_path / "p.png", "grid") == "bar"


def test_missing_sweep_dir_exits_2(cr, tmp_path: Path, capsys) -> None:
    assert cr.main([str(tmp_path / "nope")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_no_finished_jobs_exits_1(cr, tmp_path: Path, capsys) -> None:
    sweep = tmp_path / "sweep"
    make_job(sweep / "0", ["optim.blr=1e-3"])
    (sweep / "sweep_summary.json").write_text(json.dumps({"task": "pretrain", "jobs": [
        {"overrides": ["optim.blr=1e-3"], "dir": str(sweep / "0"), "status": "failed", "error": "boom",
         "log": "0/pretrain.log"}]}))
    assert cr.main([str(sweep)]) == 1
    err = capsys.readouterr().err
    assert f"no finished jobs under {sweep}" in err and "1 failed" in err and "boom" in err
    assert not (sweep / "results.md").exists()
    assert cr.main([str(tmp_path)]) == 1  # ... and a dir without any job dir at all


def test_nested_job_dirs_found_and_artefact_dirs_skipped(cr, tmp_path: Path) -> None:
    sweep = tmp_path / "sweep"
    make_job(sweep / "0", ["optim.blr=1e-3"], metrics(70, 75, 5))
    make_job(sweep / "lr_group" / "runs" / "1", ["optim.blr=2e-3"], metrics(71, 76, 4))
    # metrics.json files that are not jobs of this sweep: inside artefact folders, at any depth
    for skipped in ("tb", "checkpoints", "eval", "features", "viz"):
        make_job(sweep / skipped / "x", ["optim.blr=9"], metrics(1, 1, 1))
        make_job(sweep / "lr_group" / skipped / "x", ["optim.blr=9"], metrics(1, 1, 1))
    make_job(sweep / "0" / "eval" / "baseline", ["optim.blr=9"], metrics(1, 1, 1))  # inside a job

    jobs = cr.collect(sweep)
    assert [j["name"] for j in jobs] == ["0", "lr_group/runs/1"]
    assert [j["status"] for j in jobs] == ["completed", "completed"]


def test_summary_paths_relative_and_job_without_dir(cr, tmp_path: Path, monkeypatch) -> None:
    """Summary dirs relative to another cwd still match; a summary job whose dir never appeared is a row."""
    sweep = tmp_path / "sweep"
    make_job(sweep / "0", ["optim.blr=1e-3"], metrics(70, 75, 5))
    (sweep / "sweep_summary.json").write_text(json.dumps({"task": "pretrain", "jobs": [
        {"overrides": ["optim.blr=1e-3"], "dir": "multirun/sweep/0", "status": "completed", "error": None,
         "log": None},
        {"overrides": ["optim.blr=2e-3"], "dir": "multirun/sweep/1", "status": "failed",
         "error": "ValueError: bad\nsecond line", "log": None},
    ]}))
    monkeypatch.chdir(tmp_path)
    jobs = cr.collect(sweep, ["knn/top1"])
    assert [(j["name"], j["status"]) for j in jobs] == [("0", "completed"), ("multirun/sweep/1", "failed")]
    assert jobs[1]["error"] == "ValueError: bad"  # one line, whatever the summary holds
    assert [list(j["metrics"]) for j in jobs] == [["knn/top1"], ["knn/top1"]]


def test_metrics_and_sort_options(cr, tmp_path: Path, capsys) -> None:
    sweep = tmp_path / "sweep"
    for i, (knn, loss) in enumerate([(70.0, 3.0), (72.0, 5.0), (71.0, 4.0)]):
        make_job(sweep / str(i), ["method=dino", f"method.out_dim={1024 * 2 ** i}"], metrics(knn, 75, loss))
    assert cr.main([str(sweep), "--metrics", "knn/top1,train/steps", "--sort", "knn/top1"]) == 0
    rows = md_rows((sweep / "results.md").read_text())
    assert rows == [["2048", "completed", "72.00", "2340"], ["4096", "completed", "71.00", "2340"],
                    ["1024", "completed", "70.00", "2340"]]
    assert cr.main([str(sweep), "--sort", "train/final_loss"]) == 0  # loss: lowest first
    assert [r[0] for r in md_rows((sweep / "results.md").read_text())] == ["1024", "4096", "2048"]
    assert cr.main([str(sweep), "--metrics", "*/top1"]) == 0
    assert "| method.out_dim | status | knn/top1 | linear/top1 | baseline/knn/top1 | baseline/linear/top1 |" in \
        (sweep / "results.md").read_text()
    capsys.readouterr()
    assert cr.main([str(sweep), "--sort", "nope"]) == 2
    assert "--sort nope" in capsys.readouterr().err


def test_without_matplotlib_still_writes_table(cr, three_jobs: Path, monkeypatch, capsys) -> None:
    # None in sys.modules makes `import matplotlib...` raise ImportError, as if it were not installed
    for name in ("matplotlib", "matplotlib.figure", "matplotlib.backends.backend_agg"):
        monkeypatch.setitem(sys.modules, name, None)
    assert cr.main([str(three_jobs)]) == 0
    stdout = capsys.readouterr().out
    assert "install matplotlib (pip install 'vfm[report]') for results.png" in stdout
    assert (three_jobs / "results.md").is_file() and (three_jobs / "results.csv").is_file()
    assert not (three_jobs / "results.png").exists()
