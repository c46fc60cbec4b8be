"""scripts/results.py (the results table) and the recipe sweep's validation-only selection."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest
from script_loader import load_script


@pytest.fixture(scope="module")
def results() -> Iterator[ModuleType]:
    yield from load_script("results")


@pytest.fixture(scope="module")
def sweep() -> Iterator[ModuleType]:
    yield from load_script("recipe_sweep")


def _run(name: str, val: float, test: float) -> dict:
    return {"name": name, "overrides": [f"x={name}"],
            "metrics": {"knn/val_top1": val, "knn/top1": test, "train/steps": 10}}


def test_sweep_selects_on_validation_even_when_test_disagrees(sweep: ModuleType) -> None:
    runs = [_run("a", val=80.0, test=90.0), _run("b", val=85.0, test=70.0)]
    assert sweep.select_best(runs)["name"] == "b"
    table = sweep.validation_table(runs, "knn/val_top1")
    assert "**b**" in table and "90.00" not in table and "70.00" not in table  # test never shown


@pytest.mark.parametrize("metric", ["knn/top1", "linear/top1", "baseline/knn/top1"])
def test_sweep_refuses_to_rank_by_a_test_metric(sweep: ModuleType, metric: str) -> None:
    with pytest.raises(SystemExit, match="validation"):
        sweep.select_best([_run("a", 1.0, 2.0)], metric)


def test_sweep_refuses_an_unknown_run_name(sweep: ModuleType, monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    """A typo in --only must not start (or silently skip) hours of runs."""
    monkeypatch.setattr("sys.argv", ["recipe_sweep.py", "--only", "bs256,bs265", "--out", str(tmp_path / "s")])
    with pytest.raises(SystemExit) as exit_info:
        sweep.main()
    assert exit_info.value.code == 2 and "bs265" in capsys.readouterr().err
    assert not (tmp_path / "s").exists()


@pytest.mark.parametrize("run_set", ["recipe", "first_sweep", "supervised"])
def test_every_sweep_run_composes(sweep: ModuleType, run_set: str) -> None:
    """A mistyped key in a run's overrides fails here, not hours into a sweep."""
    from conftest import compose_cfg

    cfgs = {name: compose_cfg(overrides) for name, overrides in sweep.RUN_SETS[run_set]}
    assert all(cfg.task == "pretrain" for cfg in cfgs.values())
    if run_set == "first_sweep":  # its two rounds keep their batch, whatever the recipe says
        assert cfgs["base"].trainer.batch_size == 256 and cfgs["bs128_seed1"].trainer.batch_size == 128
        assert cfgs["bs64"].trainer.batch_size == 64 and cfgs["bs128_mom98"].trainer.max_epochs == 4
    if run_set == "supervised":  # DeiT's augmentation against none of it, whatever the recipe says
        deit, light = cfgs["deit"].method, cfgs["light"].method
        assert (deit.mixup, deit.repeated_aug, list(deit.augment.global_scale)) == (0.8, 3, [0.08, 1.0])
        assert (light.mixup, light.randaugment, light.erasing, light.repeated_aug) == (0, None, 0, 1)
        assert cfgs["light"].trainer.max_epochs == 5 and cfgs["light_e10"].trainer.max_epochs == 10


def test_rows_come_after_the_rows_they_need(results: ModuleType) -> None:
    order = [r.name for r in results.rows("outputs/results")]
    for row in results.rows("outputs/results"):
        assert all(order.index(n) < order.index(row.name) for n in row.needs), row.name


def test_a_row_whose_dependency_failed_is_not_run(results: ModuleType, tmp_path: Path) -> None:
    row = results.Row("eva", "EVA", ("method=eva",), needs=("dino",))
    rec = results.run_row(row, tmp_path, quick=True, done={"dino": False})
    assert rec == {"name": "eva", "finished": False, "error": "needs row(s) dino"}
    assert not (tmp_path / "eva").exists()


def _write_record(out: Path, name: str, **record: object) -> None:
    (out / name).mkdir(parents=True, exist_ok=True)
    (out / name / "row.json").write_text(json.dumps({"name": name, "finished": True, **record}))


def test_a_row_older_than_a_row_it_needs_is_stale(results: ModuleType, tmp_path: Path) -> None:
    eva = results.Row("eva", "EVA", ("method=eva",), needs=("dino",))
    _write_record(tmp_path, "dino", started=100.0, ended=200.0)
    _write_record(tmp_path, "eva", started=150.0, ended=160.0)  # learnt from the dino run before this one
    assert results.stale_inputs(eva, tmp_path) == ["dino"]
    _write_record(tmp_path, "eva", started=250.0, ended=260.0)
    assert results.stale_inputs(eva, tmp_path) == []
    _write_record(tmp_path, "eva")  # a record without times cannot be judged: it is kept
    assert results.stale_inputs(eva, tmp_path) == []


def test_a_stale_row_runs_again_from_scratch_and_its_old_run_is_kept(results: ModuleType, tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    eva = results.Row("eva", "EVA", ("method=eva",), needs=("dino",))
    _write_record(tmp_path, "dino", started=100.0, ended=200.0)
    _write_record(tmp_path, "eva", started=150.0, ended=160.0, commit="old", metrics={"knn/top1": 1.0})
    (tmp_path / "eva" / "checkpoints").mkdir()  # must not be resumed from

    def fake_run(cmd: list[str], **kwargs: object) -> subprocess.CompletedProcess:
        run_dir = Path(cmd[-1].removeprefix("hydra.run.dir="))
        assert not (run_dir / "checkpoints").exists()
        (run_dir / "metrics.json").write_text(json.dumps({"metrics": {"knn/top1": 2.0}}))
        return subprocess.CompletedProcess(cmd, 0)

    monkeypatch.setattr(results.subprocess, "run", fake_run)
    monkeypatch.setattr(results, "_commit", lambda: "new")
    rec = results.run_row(eva, tmp_path, quick=True, done={"dino": True})
    assert rec["finished"] and rec["metrics"] == {"knn/top1": 2.0} and rec["commit"] == "new"
    # the table's command says it was a QUICK run
    assert rec["command"] == "pretrain method=eva evaluator=[knn] trainer.max_steps=5 eval.baseline=false"
    assert rec["started"] > 200.0 and rec["ended"] >= rec["started"]
    kept = json.loads((tmp_path / "replaced" / "eva-old-150" / "row.json").read_text())
    assert kept["metrics"] == {"knn/top1": 1.0}
    assert results.run_row(eva, tmp_path, quick=True, done={"dino": True}) == rec  # now current: skipped


def test_the_table_shows_the_row_arguments_and_the_evaluation_during_training(results: ModuleType, tmp_path: Path,
                                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    def fake_run(cmd: list[str], **kwargs: object) -> subprocess.CompletedProcess:
        Path(cmd[-1].removeprefix("hydra.run.dir="), "metrics.json").write_text(json.dumps({"metrics": {}}))
        return subprocess.CompletedProcess(cmd, 0)

    monkeypatch.setattr(results.subprocess, "run", fake_run)
    monkeypatch.setattr(results, "_commit", lambda: "head")
    dino = results.Row("dino", "DINO", ("method=dino",))
    rec = results.run_row(dino, tmp_path, quick=False, done={}, curves=True)
    assert rec["command"] == "pretrain method=dino eval.every_n_epochs=1"  # not the evaluators, progress, run dir


def test_the_table_names_stale_rows(results: ModuleType) -> None:
    info = {"cpu": "CPU A", "amx": "no", "cores": "2", "torch": "2.x", "commit": "head", "gpu": "none"}
    recs = [{"name": "dino", "finished": True, "seconds": 1.0, "command": "c", "commit": "head"},
            {"name": "dense_dino", "finished": True, "seconds": 1.0, "command": "c", "commit": "head",
             "stale_inputs": ["dino"], "metrics": {}}]
    body = results.table({"dino": "DINO", "dense_dino": "dino"}, recs, info)
    assert "older version of a row they need (`--rows NAME` re-runs one): `dense_dino` (on an older `dino`)." in body
    assert "older version" not in results.table({"dino": "DINO"}, recs[:1], info)


def test_table_and_markers(results: ModuleType, tmp_path: Path) -> None:
    info = {"cpu": "Test CPU", "amx": "no", "cores": "2", "torch": "2.x", "commit": "abc", "gpu": "none"}
    recs = [{"name": "dino", "finished": True, "seconds": 125.0, "command": "pretrain method=dino",
             "metrics": {"knn/top1": 80.0, "linear/top1": 82.5, "linear/val_top1": 83.0, "train/epochs": 3}},
            {"name": "clip", "finished": True, "seconds": 60.0, "command": "pretrain method=clip",
             "metrics": {"knn/top1": 70.0, "retrieval/i2t_r1": 41.25, "zero_shot/top1": 60.0}},
            {"name": "eva", "finished": False, "error": "needs row(s) dino"},
            {"name": "mae", "finished": True, "seconds": 30.0, "command": "pretrain method=mae trainer.max_steps=5",
             "metrics": {"train/epochs": 0, "train/steps": 5}}]
    body = results.table({"dino": "DINO", "clip": "CLIP", "eva": "EVA", "mae": "MAE"}, recs, info)
    assert "| DINO | `pretrain method=dino` | 3 | 2 min 05 s |" in body and "82.50 (83.00)" in body
    assert "| MAE | `pretrain method=mae trainer.max_steps=5` | 5 steps | 0 min 30 s |" in body  # QUICK's runs
    assert "| EVA | not run: needs row(s) dino |" in body and "Test CPU" in body and "AMX: no" in body
    # image→text R@1, the last column: the CLIP row's value, a dash for an image-only row
    header, _, dino, clip, eva = body.splitlines()[2:7]
    assert header.endswith("| zero-shot | image→text R@1 |") and clip.endswith("| 60.00 | 41.25 |")
    assert dino.endswith("| – | – |")
    assert header.count("|") == dino.count("|") == clip.count("|") == eva.count("|")
    page = tmp_path / "page.md"
    page.write_text(f"intro\n{results.BEGIN}\nold\n{results.END}\noutro\n")
    results.replace_between_markers(page, body)
    text = page.read_text()
    assert text.startswith("intro\n") and text.endswith("outro\n") and "old" not in text and "82.50" in text


def test_table_names_rows_from_another_commit_or_cpu(results: ModuleType) -> None:
    """Rows kept from an earlier run say where they were measured: per commit, and the CPU when it
    is not the one in the table's first line; rows measured at the table's commit are not named."""
    info = {"cpu": "CPU A", "amx": "no", "cores": "2", "torch": "2.x", "commit": "head", "gpu": "none"}
    here = "CPU A (AMX: no)"
    recs = [{"name": "dino", "finished": True, "seconds": 1.0, "command": "c", "commit": "head", "cpu": here},
            {"name": "mae", "finished": True, "seconds": 1.0, "command": "c", "commit": "old1", "cpu": here},
            {"name": "clip", "finished": True, "seconds": 1.0, "command": "c", "commit": "old1", "cpu": "CPU B (AMX: yes)"},
            {"name": "eva", "finished": False, "error": "x", "commit": "old2"}]
    body = results.table({"dino": "DINO", "mae": "MAE", "clip": "CLIP", "eva": "EVA"}, recs, info)
    assert "earlier commit (`--rows NAME` re-runs one): at old1: `mae`, `clip`." in body
    assert "Rows measured on another CPU: `clip` on CPU B (AMX: yes)." in body
    assert "`dino`" not in body and "old2" not in body


def test_learning_curves_are_on_by_default_and_can_be_left_out(results: ModuleType) -> None:
    assert results.parse_args([]).curves is True  # the "one PNG per method" comes with make results
    assert results.parse_args(["--no-curves"]).curves is False


def test_curves_evaluate_pretrain_rows_every_epoch_only_when_asked(results: ModuleType, tmp_path: Path) -> None:
    dino, pixels = results.Row("dino", "DINO", ("method=dino",)), results.Row("pixels", "px", ("checkpoint=pixels",), entry="evaluate")
    plain = results.command(dino, tmp_path, quick=False)
    assert not any(a.startswith("eval.every_n_epochs") for a in plain)  # the default rows are unchanged
    assert results.command(dino, tmp_path, quick=False, curves=True) == [*plain[:-2], "eval.every_n_epochs=1", *plain[-2:]]
    assert results.command(pixels, tmp_path, quick=False, curves=True) == results.command(pixels, tmp_path, quick=False)


def test_the_table_says_which_self_supervised_rows_beat_the_raw_pixels(results: ModuleType) -> None:
    def rec(name: str, linear: float) -> dict:
        return {"name": name, "finished": True, "seconds": 1.0, "command": name, "metrics": {"linear/top1": linear}}

    info = {"cpu": "CPU A", "cores": 2, "amx": "no", "gpu": "none", "torch": "2", "commit": "c"}
    labels = {"pixels": "raw pixels", "dino": "DINO", "mae": "MAE", "clip": "CLIP", "ibot": "iBOT"}
    recs = [rec("pixels", 84.33), rec("dino", 81.2), rec("mae", 84.57), rec("clip", 87.76),
            {"name": "ibot", "finished": False, "error": "not run yet"}]
    body = results.table(labels, recs, info)
    # CLIP learns from captions: not a self-supervised row; iBOT has no number yet: named nowhere
    assert "raw pixels' linear probe (84.33). Above: MAE (84.57). Not above: DINO (81.20)." in body


def test_fine_tuning_rows_run_the_validation_recipe_and_sit_in_their_own_table(results: ModuleType,
                                                                              tmp_path: Path) -> None:
    """A `finetune_<row>` row fine-tunes that row's encoder with the recipe chosen on val (not the main
    table's probes) and is shown next to the linear probe of the same encoder."""
    by_name = {r.name: r for r in results.rows(str(tmp_path))}
    row, random = by_name["finetune_dino"], by_name["finetune_random"]
    assert row.needs == ("dino",) and row.entry == "evaluate"
    assert random.args == ("checkpoint=random", results.FINETUNE)  # what pretraining must beat
    cmd = results.command(row, tmp_path / "finetune_dino", quick=False)
    assert "evaluator=[finetune_fashion_mnist]" in cmd and results.EVALUATORS not in cmd
    assert "evaluator.finetune.epochs=1" in results.command(row, tmp_path, quick=True)
    info = {"cpu": "CPU A", "cores": 2, "amx": "no", "gpu": "none", "torch": "2", "commit": "c"}
    recs = [{"name": "dino", "finished": True, "seconds": 1.0, "command": "c",
             "metrics": {"linear/top1": 82.5, "linear/val_top1": 82.9}},
            {"name": "finetune_random", "finished": True, "seconds": 60.0, "command": "c",
             "metrics": {"finetune/top1": 80.0, "finetune/val_top1": 81.0, "finetune/best_epoch": 9.0}},
            {"name": "finetune_dino", "finished": True, "seconds": 845.0, "command": "c",
             "metrics": {"finetune/top1": 86.55, "finetune/val_top1": 86.77, "finetune/best_epoch": 10.0}}]
    body = results.table({"dino": "DINO", "finetune_random": "random init", "finetune_dino": "dino"}, recs, info)
    assert "| dino | 14 min 05 s | 86.55 (86.77) | 10 | 82.50 (82.90) |" in body
    assert "| random init | 1 min 00 s | 80.00 (81.00) | 9 | – |" in body
    main_table = body.split("Fine-tuning (")[0]
    assert "86.55" not in main_table  # not a row of the main table


def test_the_fine_tuning_recipe_composes(results: ModuleType) -> None:
    from conftest import compose_cfg

    cfg = compose_cfg(["checkpoint=random", results.FINETUNE], config_name="evaluate")
    ft = cfg.evaluator.finetune
    assert list(cfg.evaluator) == ["finetune"] and ft._target_.endswith("FineTune")
    assert (ft.epochs, ft.blr, ft.mixup, ft.cutmix, list(ft.crop_scale)) == (10, 1e-3, 0.0, 0.0, [0.8, 1.0])
    assert (ft.layer_decay, ft.drop_path, ft.label_smoothing) == (0.75, 0.1, 0.1)  # MAE's, unchanged
