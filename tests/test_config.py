"""Every config group composes and validates; config errors fail before any data is read."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from conftest import TINY, compose_cfg
from vfm.config import CONF_DIR, ConfigError, validate_pretrain
from vfm.methods.dino import DINO

GROUPS = ["backbone", "method", "dataset", "optim", "trainer", "logger", "evaluator", "experiment"]
NEEDS_VALUE = {("dataset", "imagefolder"): "dataset.root", ("dataset", "unlabeled_folder"): "dataset.root",
               ("backbone", "timm"): "backbone.name", ("experiment", "dino_vit_small_imagenet"): "dataset.root",
               ("dataset", "image_text_csv"): "dataset.train_csv", ("dataset", "webdataset"): "dataset.urls",
               ("method", "clip"): "dataset=fashion_mnist_captions", ("method", "beit"): "method.tokenizer", ("method", "vqkd"): "method.teacher",
               ("method", "eva"): "method.teacher", ("method", "eva02"): "method.teacher"}


def _options(group: str) -> list[str]:
    return sorted(p.stem for p in (Path(CONF_DIR) / group).glob("*.yaml"))


@pytest.mark.parametrize("group,option", [(g, o) for g in GROUPS for o in _options(g)])
def test_each_group_option_composes_and_validates(group, option, tmp_path):
    overrides = [f"evaluator=[{option}]"] if group == "evaluator" else [f"{group}={option}"]
    if group == "dataset":
        # a patch and local-crop size that fit every dataset's image size
        overrides += ["backbone.patch_size=4", "method.augment.local_crop_size=16"]
    cfg = compose_cfg(overrides, tmp_path)
    key = NEEDS_VALUE.get((group, option))
    if key:
        with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
            validate_pretrain(cfg)
    else:
        validate_pretrain(cfg)


@pytest.mark.parametrize("recipe", _options("recipe"))
def test_each_recipe_composes_with_its_dataset(recipe, tmp_path):
    kind = max((m for m in ["eval", *_options("method")] if recipe.startswith(m + "_")), key=len)
    dataset = recipe[len(kind) + 1:]
    if kind == "eval":
        cfg = compose_cfg([f"dataset={dataset}", "checkpoint=random"], tmp_path, "evaluate")
        assert cfg.backbone.patch_size and cfg.dataset.img_size % cfg.backbone.patch_size == 0
    else:
        files = {"beit": ["method.tokenizer=."], "vqkd": ["method.teacher=."], "eva": ["method.teacher=."],
                 "eva02": ["method.teacher=."]}.get(kind, [])  # existing paths; the files are read later
        cfg = compose_cfg([f"method={kind}", f"dataset={dataset}", *files], tmp_path)
        validate_pretrain(cfg)


def test_every_group_is_in_the_defaults():
    cfg = compose_cfg([])
    for key in ["paths", "backbone", "method", "dataset", "optim", "trainer", "logger", "evaluator", "eval"]:
        assert key in cfg, key
    assert list(cfg.evaluator.keys()) == ["knn", "linear"]


def test_overrides_reach_the_config():
    cfg = compose_cfg(["method=dino", "optim.blr=1e-3", "trainer.max_epochs=5"])
    assert cfg.optim.blr == 1e-3 and cfg.trainer.max_epochs == 5


def test_wrong_type_names_key():
    with pytest.raises(ConfigError, match=r"trainer\.max_epochs='abc' has the wrong type.*int"):
        validate_pretrain(compose_cfg(TINY + ["trainer.max_epochs=abc"]))


def test_unknown_key_names_key_and_suggests():
    with pytest.raises(ConfigError, match=r"unknown key method\.out_dimm.*Did you mean method\.out_dim"):
        validate_pretrain(compose_cfg(TINY + ["+method.out_dimm=3"]))


def test_missing_value_names_key():
    with pytest.raises(ConfigError, match=r"dataset\.root"):
        validate_pretrain(compose_cfg(["dataset=imagefolder"]))


def test_batch_not_divisible_by_processes():
    with pytest.raises(ConfigError, match=r"trainer\.batch_size=64 is not divisible by 3 process"):
        validate_pretrain(compose_cfg(TINY), world_size=3)


def test_method_needing_patch_tokens_rejects_cnn(monkeypatch):
    monkeypatch.setattr(DINO, "needs_patch_tokens", True)
    with pytest.raises(ConfigError, match=r"needs patch tokens.*backbone\.name=resnet18"):
        validate_pretrain(compose_cfg(TINY + ["backbone=resnet18"]))


def test_patch_size_must_divide_image():
    with pytest.raises(ConfigError, match=r"backbone\.patch_size=16 does not divide dataset\.img_size=28"):
        validate_pretrain(compose_cfg(["backbone.patch_size=16"]))


def test_cli_fails_fast_before_reading_data(tmp_path):
    # A data folder that does not exist: the config error must win, so no data was touched.
    cmd = [sys.executable, "-m", "vfm.pretrain", "trainer.max_epochs=abc", f"paths.data_dir={tmp_path}/nowhere",
           f"hydra.run.dir={tmp_path}/run"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert "trainer.max_epochs='abc' has the wrong type" in proc.stderr + proc.stdout
    assert "not found" not in (proc.stderr + proc.stdout).lower()


def test_run_directory_names_can_be_passed_back_as_overrides():
    # run dirs name the overrides; "=" or "," inside a value would be parsed by Hydra as syntax
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from omegaconf import OmegaConf

    sep = OmegaConf.load(Path(CONF_DIR) / "hydra" / "default.yaml").job.config.override_dirname
    name = sep.item_sep.join(f"{k}{sep.kv_sep}{v}" for k, v in [("method", "beit"), ("method.tokenizer", "outputs_x"),
                                                                  ("optim.blr", "0.001")])
    parsed = OverridesParser.create().parse_override(f"method.teacher=outputs/pretrain/{name}")
    assert parsed.value() == f"outputs/pretrain/{name}"


def test_long_run_names_stay_distinct():
    from vfm.config import run_name

    common = "+".join(f"method.key_{i}-{i}" for i in range(30))  # far beyond a file name's length
    a, b = run_name(common + "+optim.blr-0.001"), run_name(common + "+optim.blr-0.002")
    assert a != b and len(a.encode()) <= 200 and len(b.encode()) <= 200
    assert a.startswith("method.key_0-0+") and "+hash-" in a
    assert run_name("optim.blr-0.001") == "optim.blr-0.001" and run_name("") == "default"
    assert run_name(common) == run_name(common)  # the same command finds the same directory
