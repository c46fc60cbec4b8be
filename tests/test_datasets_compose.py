"""Every dataset option works with the default method (DINO) and backbone: it composes into a
config that validates, and trains a few steps wherever its data is at hand (generated here in a
temporary folder, or installed, as Fashion-MNIST and MNIST may be).

What a dataset needs by nature is the only thing passed: its files (a folder, a CSV, shards) and,
without labels, `evaluator=[]` (kNN and the linear probe need labels). Image sizes, crop and patch
sizes come from the configs: `conf/recipe/dino_<dataset>.yaml` where the images are small.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from PIL import Image

from conftest import compose_cfg
from vfm import pretrain
from vfm.config import CONF_DIR, ConfigError, validate_pretrain
from vfm.data.datasets import DatasetNotFoundError

DATASETS = sorted(p.stem for p in (Path(CONF_DIR) / "dataset").glob("*.yaml"))
NO_LABELS = "evaluator=[]"
# Data that is generated or made here; the benchmarks below only where they are installed.
RUNNABLE = ["synthetic", "synthetic_captions", "imagefolder", "unlabeled_folder", "image_text_csv", "webdataset",
            "fashion_mnist", "fashion_mnist_captions", "mnist"]
# Two steps of a 1-block encoder, a 1024-prototype head and 2 local crops, for speed; every image,
# crop and patch size is the config's own.
STEPS = ["trainer.max_steps=2", "trainer.batch_size=2", "trainer.log_every_n_steps=1", "trainer.device=cpu",
         "trainer.precision=fp32", "trainer.progress=false", "eval.baseline=false", "logger=none",
         "backbone.model_kwargs.depth=1", "method.out_dim=1024", "method.augment.n_local=2"]


def _png(seed: int, size: tuple[int, int] = (20, 16)) -> bytes:
    """A small random RGB PNG (width x height `size`)."""
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


def _write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def _image_folder(root: Path) -> Path:
    for split, n in (("train", 6), ("val", 2)):
        for c, cls in enumerate(("circle", "square")):
            for i in range(n):
                _write(root / split / cls / f"{i}.png", _png(seed=100 * c + 10 * (split == "val") + i))
    return root


def _csv(root: Path) -> Path:
    rows = ["filepath,title"]
    for i in range(8):
        _write(root / "images" / f"{i}.png", _png(seed=i))
        rows.append(f"images/{i}.png,a photo of thing {i}")
    (root / "pairs.csv").write_text("\n".join(rows) + "\n")
    return root / "pairs.csv"


def _shard(root: Path) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    path = root / "shard-000000.tar"
    with tarfile.open(path, "w") as tf:
        for i in range(8):
            for name, data in ((f"s{i}.png", _png(seed=i)), (f"s{i}.txt", f"thing {i}".encode())):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))
    return path


def needs(dataset: str, tmp_path: Path) -> list[str]:
    """The overrides `dataset` needs by nature, with its files made under `tmp_path`."""
    data = tmp_path / "data"
    return {
        "imagefolder": lambda: [f"dataset.root={_image_folder(data)}"],
        "segmentation_folder": lambda: [f"dataset.root={_image_folder(data)}", NO_LABELS],
        "unlabeled_folder": lambda: [f"dataset.root={_image_folder(data)}", NO_LABELS],
        "image_text_csv": lambda: [f"dataset.train_csv={_csv(data)}", NO_LABELS],
        "webdataset": lambda: [f"dataset.urls={_shard(data)}", NO_LABELS],
    }.get(dataset, lambda: [])()


@pytest.mark.parametrize("dataset", DATASETS)
def test_every_dataset_composes_with_the_default_method(dataset, tmp_path):
    extra = needs(dataset, tmp_path)
    cfg = compose_cfg([f"dataset={dataset}", *extra], tmp_path / "run")
    assert cfg.method._target_ == "vfm.methods.dino.DINO"
    validate_pretrain(cfg)
    assert cfg.dataset.img_size % cfg.backbone.patch_size == 0
    assert cfg.method.augment.local_crop_size <= cfg.method.augment.global_crop_size == cfg.dataset.img_size
    # each of them is needed, and its absence is named
    for override in extra:
        key = override.split("=")[0] if override != NO_LABELS else NO_LABELS
        with pytest.raises(ConfigError, match=key.replace(".", r"\.").replace("[", r"\[").replace("]", r"\]")):
            validate_pretrain(compose_cfg([f"dataset={dataset}", *(o for o in extra if o != override)]))


@pytest.mark.parametrize("dataset", RUNNABLE)
def test_default_method_trains_on_every_dataset_at_hand(dataset, tmp_path):
    extra = needs(dataset, tmp_path)
    # kNN where the training set (its memory bank) is small; no evaluator on the 60k-image benchmarks
    small = dataset.startswith("synthetic") or dataset == "imagefolder"
    evaluators = ["evaluator=[knn]", "evaluator.knn.k=5"] if small else [NO_LABELS]
    cfg = compose_cfg([f"dataset={dataset}", *evaluators, *extra, *STEPS], tmp_path / "run")
    if not (dataset.startswith("synthetic") or extra):
        try:  # an installed benchmark: Debian's dataset-fashion-mnist, or data/ (make data)
            instantiate(cfg.dataset)
        except InstantiationException as e:
            if not isinstance(e.__cause__, DatasetNotFoundError):
                raise
            pytest.skip(f"{dataset} is not installed (make data)")
    metrics = pretrain.run(cfg)
    assert metrics["train/steps"] == 2 and np.isfinite(metrics["train/final_loss"])
    if small:
        assert 0 <= metrics["knn/top1"] <= 100


def test_pretrain_synthetic_runs_with_no_size_override(tmp_path):
    """`pretrain dataset=synthetic`, the first smoke run: only its length and output folder set."""
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "vfm.pretrain", "dataset=synthetic", "trainer.max_steps=2", "evaluator=[]",
           "eval.baseline=false", "trainer.progress=false", f"hydra.run.dir={run}"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads((run / "metrics.json").read_text())
    assert out["metrics"]["train/steps"] == 2
    assert out["config_files"][-1] == "recipe/dino_synthetic.yaml"
