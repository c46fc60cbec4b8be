"""Shared fixtures: compose real configs from conf/ with tiny, fast overrides."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig, open_dict

from vfm.config import CONF_DIR, register_resolvers

# A run that takes a few seconds on 2 CPU cores: synthetic data, a 2-block ViT, a small head.
TINY = [
    "dataset=synthetic",
    "backbone.patch_size=7",
    "+backbone.model_kwargs={depth: 2, embed_dim: 32, num_heads: 2}",
    "method.out_dim=64",
    "method.hidden_dim=64",
    "method.bottleneck_dim=32",
    "method.augment.local_crop_size=14",
    "method.augment.n_local=2",
    "trainer.max_epochs=2",
    "trainer.batch_size=64",
    "trainer.progress=false",
    "trainer.device=cpu",
    "optim.warmup_epochs=0.5",
    "eval.batch_size=256",
]


def compose_cfg(overrides: list[str], run_dir: Path | None = None, config_name: str = "pretrain") -> DictConfig:
    register_resolvers()
    with initialize_config_dir(CONF_DIR, version_base="1.3"):
        cfg = compose(config_name, overrides=overrides)
    if run_dir is not None:
        with open_dict(cfg):
            cfg.paths.output_dir = str(run_dir)
    return cfg


@pytest.fixture(autouse=True)
def _single_thread_for_data_tests(request):
    """One intra-op thread for tests/data: their tensors are tiny, and on a loaded 2-core machine
    every parallel region of two OpenMP threads can wait a whole scheduler slice (observed: 50 ms
    -> 4 s). (A tests/data/conftest.py would shadow this module for `from conftest import ...`.)"""
    if Path(str(request.path)).parent.name != "data":
        yield
        return
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def tiny_cfg(tmp_path):
    def make(*extra: str, run_dir: Path | None = None) -> DictConfig:
        return compose_cfg(TINY + list(extra), run_dir or tmp_path / "run")

    return make
