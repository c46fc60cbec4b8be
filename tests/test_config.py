"""Every config group composes and validates; config errors fail before any data is read."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from conftest import TINY, TINY_BASE, compose_cfg
from vfm.config import (
    CONF_DIR,
    ConfigError,
    applied_configs,
    dataset_yields_captions,
    instantiate_evaluators,
    register_resolvers,
    validate_pretrain,
)
from vfm.methods.dino import DINO

GROUPS = ["backbone", "method", "dataset", "optim", "trainer", "logger", "evaluator", "experiment"]
NEEDS_VALUE = {("dataset", "imagefolder"): "dataset.root", ("dataset", "unlabeled_folder"): "dataset.root",
               ("dataset", "segmentation_folder"): "dataset.root",
               ("backbone", "timm"): "backbone.name", ("experiment", "dino_vit_small_imagenet"): "dataset.root",
               ("experiment", "dinov2_vit_large_imagenet"): "dataset.root",
               ("dataset", "image_text_csv"): "dataset.train_csv", ("dataset", "webdataset"): "dataset.urls",
               ("method", "clip"): "dataset=fashion_mnist_captions", ("method", "siglip"): "dataset=fashion_mnist_captions",
               ("method", "beit"): "method.tokenizer", ("method", "vqkd"): "method.teacher",
               ("method", "eva"): "method.teacher", ("method", "eva02"): "method.teacher",
               ("experiment", "beit_base_imagenet"): "method.tokenizer", ("method", "distill"): "method.teacher"}
EXPERIMENT_FILES = {"beit_base_imagenet": ["method.tokenizer=."]}  # existing paths; the files are read later


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


def _selecting_experiment(recipe: str) -> str | None:
    """The experiment that selects a recipe not named <method>_<dataset> (never applied automatically)."""
    for name in _options("experiment"):
        if f"override /recipe: {recipe}" in (Path(CONF_DIR) / "experiment" / f"{name}.yaml").read_text():
            return name
    return None


@pytest.mark.parametrize("recipe", _options("recipe"))
def test_each_recipe_composes_with_its_dataset(recipe, tmp_path):
    experiment = _selecting_experiment(recipe)
    if experiment is not None:  # an explicit recipe: composed through the experiment that selects it
        cfg = compose_cfg([f"experiment={experiment}", "dataset.root=.", *EXPERIMENT_FILES.get(experiment, [])], tmp_path)
        validate_pretrain(cfg)
        return
    kind = max((m for m in ["eval", *_options("method")] if recipe.startswith(m + "_")), key=len)
    dataset = recipe[len(kind) + 1:]
    assert dataset in _options("dataset"), f"recipe/{recipe}.yaml is neither <method>_<dataset> nor selected by an experiment"
    if kind == "eval":
        cfg = compose_cfg([f"dataset={dataset}", "checkpoint=random"], tmp_path, "evaluate")
        assert cfg.backbone.patch_size and cfg.dataset.img_size % cfg.backbone.patch_size == 0
    else:
        files = {"beit": ["method.tokenizer=."], "vqkd": ["method.teacher=."], "eva": ["method.teacher=."],
                 "eva02": ["method.teacher=."], "distill": ["method.teacher=."]}.get(kind, [])  # existing paths; the files are read later
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


@pytest.mark.parametrize("config_name", ["pretrain", "evaluate"])
@pytest.mark.parametrize("progress", [True, False])
def test_fine_tuning_bars_follow_trainer_progress(config_name, progress, tmp_path):
    extra = ["checkpoint=random"] if config_name == "evaluate" else []
    cfg = compose_cfg(["evaluator=[knn,finetune]", f"trainer.progress={progress}", *extra], tmp_path, config_name)
    evaluators = instantiate_evaluators(cfg)
    assert set(evaluators) == {"knn", "finetune"}
    assert evaluators["finetune"].progress is progress


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


def test_evaluation_during_training_does_not_rename_the_run():
    """Adding kNN on val every epoch to a run (e.g. `results.py --curves`) resumes the same run."""
    from hydra import compose, initialize_config_dir

    register_resolvers()

    def name(overrides: list[str]) -> str:  # the job.override_dirname Hydra computes for a command
        with initialize_config_dir(CONF_DIR, version_base="1.3"):
            return compose("pretrain", overrides=overrides, return_hydra_config=True).hydra.job.override_dirname

    assert name(["method=ibot", "eval.every_n_epochs=1", "eval.periodic=[knn]"]) == name(["method=ibot"]) == "method-ibot"
    assert name(["method=ibot", "eval.baseline=false"]) != name(["method=ibot"])  # other eval keys still count


def _applied(overrides: list[str], config_name: str = "pretrain") -> dict[str, list[str]] | None:
    """applied_configs() as inside a command: Hydra's run config set for the composition."""
    from hydra import compose, initialize_config_dir
    from hydra.core.hydra_config import HydraConfig

    register_resolvers()
    with initialize_config_dir(CONF_DIR, version_base="1.3"):
        cfg = compose(config_name, overrides=overrides, return_hydra_config=True)
        HydraConfig.instance().set_config(cfg)
        try:
            return applied_configs()
        finally:
            HydraConfig.instance().cfg = None


DEFAULT_FILES = ["paths/default.yaml", "backbone/vit_tiny_d6.yaml", "method/dino.yaml", "dataset/fashion_mnist.yaml",
                 "optim/adamw.yaml", "optim/dino.yaml", "trainer/default.yaml", "logger/tensorboard.yaml",
                 "evaluator/knn.yaml", "evaluator/linear.yaml", "pretrain.yaml", "recipe/dino_fashion_mnist.yaml"]


def test_default_run_names_every_file_it_applies_recipe_last():
    assert applied_configs() is None  # outside a command: not known
    assert _applied([]) == {"files": DEFAULT_FILES, "overrides": []}
    # a recipe that extends another lists both; files pulled in by a method too
    assert _applied(["dataset=mnist"])["files"][-2:] == ["recipe/dino_fashion_mnist.yaml", "recipe/dino_mnist.yaml"]
    assert "method/text_tower/transformer.yaml" in _applied(["method=clip", "dataset=fashion_mnist_captions"])["files"]
    # no recipe/mae_cifar10.yaml: nothing listed for the optional entry
    assert not any(f.startswith("recipe/") for f in _applied(["method=mae", "dataset=cifar10"])["files"])
    # an experiment selects its groups and its recipe
    files = _applied(["experiment=dino_vit_small_imagenet", "dataset.root=/data"])["files"]
    assert {"backbone/vit_small.yaml", "dataset/imagefolder.yaml", "recipe/dino_vit_small_imagenet.yaml",
            "experiment/dino_vit_small_imagenet.yaml"} <= set(files)
    assert "eval_fashion_mnist" in _applied(["checkpoint=random"], "evaluate")["files"][-1]


def test_recipe_can_be_turned_off_and_the_default_is_unchanged():
    cfg, off = compose_cfg([]), compose_cfg(["~recipe"])
    # what the recipe changes: DINO's paper values come back without it
    assert (cfg.method.out_dim, cfg.backbone.patch_size, cfg.trainer.max_epochs) == (4096, 7, 3)
    assert (off.method.out_dim, off.backbone.patch_size, off.trainer.max_epochs) == (65536, 16, 100)
    assert "recipe/dino_fashion_mnist.yaml" not in _applied(["~recipe"])["files"]
    # the experiment spelling out the default composes exactly the default
    assert compose_cfg(["experiment=dino_fashion_mnist_cpu"]) == cfg


def test_method_and_dataset_declare_captions():
    validate_pretrain(compose_cfg(TINY_BASE + ["dataset=synthetic_captions", "method=clip", "method.embed_dim=32",
                                               "method.text_tower.width=32", "method.text_tower.heads=2"]))
    with pytest.raises(ConfigError, match=r"trains on image-text pairs but dataset .* has no captions"):
        validate_pretrain(compose_cfg(TINY_BASE + ["method=clip"]))
    assert dataset_yields_captions(compose_cfg(["dataset=fashion_mnist_captions"]).dataset._target_)
    assert not dataset_yields_captions(compose_cfg([]).dataset._target_)


def test_method_target_must_be_a_method():
    with pytest.raises(ConfigError, match=r"is not a vfm\.methods\.base\.Method subclass"):
        validate_pretrain(compose_cfg(TINY + ["method._target_=builtins.dict"]))


def test_long_run_names_stay_distinct():
    from vfm.config import run_name

    common = "+".join(f"method.key_{i}-{i}" for i in range(30))  # far beyond a file name's length
    a, b = run_name(common + "+optim.blr-0.001"), run_name(common + "+optim.blr-0.002")
    assert a != b and len(a.encode()) <= 200 and len(b.encode()) <= 200
    assert a.startswith("method.key_0-0+") and "+hash-" in a
    assert run_name("optim.blr-0.001") == "optim.blr-0.001" and run_name("") == "default"
    assert run_name(common) == run_name(common)  # the same command finds the same directory
