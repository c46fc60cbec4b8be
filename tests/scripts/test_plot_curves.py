"""scripts/plot_curves.py: a run's validation curve from curves.json, its random init dashed."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest
from script_loader import load_script


@pytest.fixture(scope="module")
def plot_curves() -> Iterator[ModuleType]:
    yield from load_script("plot_curves")


def _run(root: Path, name: str, values: list[float], baseline: float | None) -> Path:
    run = root / name
    run.mkdir()
    points = [{"epoch": e + 1, "step": 10 * (e + 1), "metrics": {"knn/val_top1": v, "knn/val_top5": 99.0}}
              for e, v in enumerate(values)]
    (run / "curves.json").write_text(json.dumps(points))
    if baseline is not None:
        metrics = {"knn/top1": 1.0, "knn/val_top1": values[-1], "baseline/knn/val_top1": baseline}
        (run / "metrics.json").write_text(json.dumps({"metrics": metrics}))
    return run


def test_writes_a_png_with_the_curve_and_the_random_init(plot_curves: ModuleType, tmp_path: Path) -> None:
    dino, mae = _run(tmp_path, "dino", [60.0, 70.0, 75.5], baseline=55.0), _run(tmp_path, "mae", [40.0, 45.0], None)
    out = tmp_path / "docs" / "curves" / "dino.png"
    assert plot_curves.main([str(dino), str(mae), "--out", str(out)]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    runs = {name: plot_curves.read_run(run, "knn/val_top1") for name, run in (("dino", dino), ("mae", mae))}
    assert runs["dino"] == ([1.0, 2.0, 3.0], [60.0, 70.0, 75.5], 55.0) and runs["mae"][2] is None
    lines = plot_curves.plot(runs, "knn/val_top1", tmp_path / "again.png").axes[0].get_lines()
    # dino's curve, its random init (dashed, same colour, flat), mae's curve (no random init recorded)
    assert [list(line.get_ydata()) for line in lines] == [[60.0, 70.0, 75.5], [55.0, 55.0], [40.0, 45.0]]
    assert [line.get_linestyle() for line in lines] == ["-", "--", "-"]
    assert lines[0].get_color() == lines[1].get_color() != lines[2].get_color()


def test_a_run_without_the_curve_or_the_metric_is_refused(plot_curves: ModuleType, tmp_path: Path, capsys) -> None:
    (tmp_path / "empty").mkdir()
    assert plot_curves.main([str(tmp_path / "empty"), "--out", str(tmp_path / "x.png")]) == 2
    assert "eval.every_n_epochs=1" in capsys.readouterr().err
    run = _run(tmp_path, "dino", [60.0], baseline=None)
    assert plot_curves.main([str(run), "--out", str(tmp_path / "x.png"), "--metric", "knn/top1"]) == 2
    assert not (tmp_path / "x.png").exists()  # curves.json holds no test metric to draw
