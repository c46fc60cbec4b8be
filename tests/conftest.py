"""Shared fixtures: compose real configs from conf/ with tiny, fast overrides."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig, open_dict
from torch import nn

from dino_teachers import tiny_dino_checkpoint
from vfm.config import CONF_DIR, register_resolvers
from vfm.methods.base import Method

# A run that takes a few seconds on 2 CPU cores: synthetic data, a 2-block ViT, a small head.
TINY_BASE = [
    "dataset=synthetic",
    "backbone.patch_size=7",
    "+backbone.model_kwargs={depth: 2, embed_dim: 32, num_heads: 2}",
    "trainer.max_epochs=2",
    "trainer.batch_size=64",
    "trainer.progress=false",
    "trainer.device=cpu",
    "optim.warmup_epochs=0.5",
    "eval.batch_size=256",
]
# the DINO family's heads and crops, small
TINY = TINY_BASE[:3] + [
    "method.out_dim=64",
    "method.hidden_dim=64",
    "method.bottleneck_dim=32",
    "method.augment.local_crop_size=14",
    "method.augment.n_local=2",
] + TINY_BASE[3:]
TINY_DECODER = ["method.decoder_dim=32", "method.decoder_depth=1", "method.decoder_heads=2"]


def tiny_method_overrides(method: str, artifacts: dict[str, Path]) -> list[str]:
    """TINY_BASE plus the method's own small settings (and the teacher/tokenizer files it needs)."""
    if method in ("dino", "ibot", "dinov2"):
        return TINY + [f"method={method}"] + (["method.masking.min_num_patches=1"] if method != "dino" else [])
    extra = {
        "mae": TINY_DECODER,
        "vq_tokenizer": TINY_DECODER + ["method.num_codes=16", "method.code_dim=8"],
        "vqkd": TINY_DECODER + ["method.num_codes=16", "method.code_dim=8", f"method.teacher={artifacts['teacher']}",
                                "method.teacher_normalize=dataset"],
        "beit": [f"method.tokenizer={artifacts['tokenizer']}", "method.masking.min_num_patches=1"],
        # the tiny teacher was trained on 1-channel data: no CLIP renormalisation
        "eva": [f"method.teacher={artifacts['teacher']}", "method.masking.min_num_patches=1", "method.teacher_normalize=dataset"],
        "eva02": [f"method.teacher={artifacts['teacher']}", "method.masking.min_num_patches=1",
                  "method.teacher_normalize=dataset"],
        "supervised": [],
        # 4 px patches: a 7x7 grid for the blocks (the official min_keep 10 exceeds a target block there)
        "ijepa": ["backbone.patch_size=4", "method.predictor_dim=32", "method.predictor_depth=1",
                  "method.masking.min_keep=3", "method.masking.target_scale=[0.1,0.15]"],
        "distill": [f"method.teacher={artifacts.get('dino_teacher')}", "method.augment.local_crop_size=14",
                    "method.augment.n_local=2"],
        "clip": ["method.embed_dim=32", "method.text_tower.width=32", "method.text_tower.layers=1",
                 "method.text_tower.heads=2", "method.text_tower.context_length=32"],
    }
    extra["siglip"] = extra["clip"]
    extra = extra[method]
    base = [("dataset=synthetic_captions" if o == "dataset=synthetic" and method in ("clip", "siglip") else o)
            for o in TINY_BASE]
    return base + [f"method={method}"] + extra


@pytest.fixture(scope="session")
def mim_artifacts(tmp_path_factory) -> dict[str, Path]:
    """A tiny exported encoder (the EVA / VQ-KD teacher) and a tiny tokenizer.pt (for BEiT), both
    with the TINY backbone's 7 px patches on 28 px, 1-channel images."""
    from vfm.backbones import Backbone
    from vfm.heads.tokenizer import Tokenizer

    root = tmp_path_factory.mktemp("mim")
    torch.manual_seed(0)
    kw = dict(img_size=28, patch_size=7, in_chans=1, model_kwargs=dict(depth=1, embed_dim=24, num_heads=2))
    teacher = Backbone("vit_tiny_patch16_224", **kw).export(root / "teacher.safetensors")
    tokenizer = Tokenizer(Backbone("vit_tiny_patch16_224", **kw), num_codes=16, code_dim=8, kmeans_init=False)
    return {"teacher": teacher, "tokenizer": tokenizer.save(root / "tokenizer.pt"),
            "dino_teacher": tiny_dino_checkpoint(root / "dinov2_teacher.pt")}


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
def tiny_method_cfg(tmp_path, mim_artifacts):
    def make(method: str, *extra: str, run_dir: Path | None = None) -> DictConfig:
        return compose_cfg(tiny_method_overrides(method, mim_artifacts) + list(extra), run_dir or tmp_path / "run")

    return make


@pytest.fixture
def tiny_cfg(tmp_path):
    def make(*extra: str, run_dir: Path | None = None) -> DictConfig:
        return compose_cfg(TINY + list(extra), run_dir or tmp_path / "run")

    return make


class Regression(Method):
    """A linear model on flattened 4x4 images: the smallest method the trainer can run (with
    `regression_collate`)."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Linear(16, 1)

    @property
    def encoder(self) -> nn.Module:
        return self.net

    def training_step(self, batch, step, sched):
        pred = self.net(batch["x"]).float().squeeze(1)
        return {"loss": (pred - batch["y"]).pow(2).mean()}


def regression_collate(samples):
    x = torch.stack([s[0] for s in samples]).flatten(1).float() / 255
    return {"x": x, "y": torch.tensor([float(s[1]) for s in samples])}
