"""`trainer.strategy=fsdp` (FSDP2) against DDP on 2 CPU processes (gloo), its checkpoints, and
`trainer.augment_on_device`."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch

from conftest import TINY, tiny_method_overrides
from vfm import pretrain
from vfm.engine.fsdp import fsdp_units
from vfm.engine.trainer import Trainer

# 2 epochs of 8 steps, fp32 (so the two strategies are compared without bf16 rounding), DINO's
# per-parameter clipping on, the last layer frozen during epoch 1 (parameters without optimizer
# state at the checkpoint)
COMMON = ["trainer.precision=fp32", "evaluator=[]", "eval.baseline=false"]


def torchrun(run: Path, *overrides: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "vfm.pretrain",
           *COMMON, *overrides, f"hydra.run.dir={run}"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def last(run: Path) -> dict:
    return torch.load(run / "checkpoints/last.pt", weights_only=False)


def max_diff(a: dict, b: dict) -> float:
    assert a["model"].keys() == b["model"].keys()
    return max((a["model"][k].double() - b["model"][k].double()).abs().max().item() for k in a["model"])


def assert_bitwise(a: dict, b: dict) -> None:
    assert a["step"] == b["step"]
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    sa, sb = a["optimizer"]["state"], b["optimizer"]["state"]
    assert sa.keys() == sb.keys()
    for i in sa:
        assert torch.equal(sa[i]["exp_avg"], sb[i]["exp_avg"]) and torch.equal(sa[i]["exp_avg_sq"], sb[i]["exp_avg_sq"]), i


def test_units_are_transformer_blocks_and_resnet_stages():
    vit = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=3, num_classes=0)
    assert fsdp_units(vit) == list(vit.blocks)
    resnet = timm.create_model("resnet18", num_classes=0)
    assert fsdp_units(resnet) == [resnet.layer1, resnet.layer2, resnet.layer3, resnet.layer4]


def test_unknown_strategy_is_rejected():
    with pytest.raises(ValueError, match="trainer.strategy must be one of"):
        Trainer(strategy="zero3")


@pytest.mark.slow
def test_fsdp_trains_like_ddp_and_resumes_exactly_from_either(tmp_path):
    dino = [*TINY, "method=dino"]
    evaluate = ["evaluator=[knn]", "eval.every_n_epochs=1"]  # after epoch 1: rank 0 evaluates gathered weights
    ddp = torchrun(tmp_path / "ddp", *dino, *evaluate, "trainer.strategy=ddp")
    torchrun(tmp_path / "fsdp", *dino, *evaluate, "trainer.strategy=fsdp")
    # 2 student + 2 teacher blocks
    assert "FSDP: 4 sharded units + the root over 2 processes" in (tmp_path / "fsdp/pretrain.log").read_text()
    a, b = last(tmp_path / "ddp"), last(tmp_path / "fsdp")
    # the same checkpoint format (full tensors, optimizer state by parameter index) and the same
    # training: only the order of the floating-point reductions differs
    assert {k: v.shape for k, v in a["model"].items()} == {k: v.shape for k, v in b["model"].items()}
    assert a["optimizer"]["state"].keys() == b["optimizer"]["state"].keys()
    assert [h["loss"] for h in a["history"]] == pytest.approx([h["loss"] for h in b["history"]], abs=1e-5)
    assert max_diff(a, b) < 1e-4
    assert a["history"][0]["knn/val_top1"] == pytest.approx(b["history"][0]["knn/val_top1"], abs=0.5)
    assert "exported encoder weights" in ddp.stderr + (tmp_path / "ddp/pretrain.log").read_text()

    # interrupted after step 5 (epoch 1, last layer still frozen), then resumed: bitwise equal
    torchrun(tmp_path / "cut", *dino, "trainer.strategy=fsdp", "trainer.max_steps=5")
    assert last(tmp_path / "cut")["step"] == 5
    torchrun(tmp_path / "cut", *dino, "trainer.strategy=fsdp")
    assert_bitwise(last(tmp_path / "cut"), b)

    # a DDP checkpoint resumes under FSDP (the format is shared)
    torchrun(tmp_path / "cross", *dino, "trainer.strategy=ddp", "trainer.max_steps=5")
    torchrun(tmp_path / "cross", *dino, "trainer.strategy=fsdp")
    assert max_diff(last(tmp_path / "cross"), b) < 1e-4


@pytest.mark.slow
def test_fsdp_clip_keeps_its_scalar_logit_scale(tmp_path, mim_artifacts):
    """FSDP2 cannot shard 0-d parameters; the checkpoint must still hold CLIP's scalar."""
    run = tmp_path / "clip"
    torchrun(run, *tiny_method_overrides("clip", mim_artifacts), "trainer.max_epochs=1", "trainer.strategy=fsdp")
    state = last(run)
    assert state["model"]["logit_scale"].shape == ()
    moments = [s for i, s in state["optimizer"]["state"].items() if s["exp_avg"].ndim == 0]
    assert len(moments) == 1  # logit_scale's, back to its own shape
    assert (run / "metrics.json").exists()


def test_augment_on_device_trains_bitwise_like_augmenting_in_the_loader(tiny_method_cfg, tmp_path):
    """On the CPU the deferred path computes exactly the same batches (crops and iBOT masks)."""
    states = []
    for flag in ("false", "true"):
        run = tmp_path / flag
        cfg = tiny_method_cfg("ibot", "trainer.max_epochs=1", "trainer.max_steps=3", *COMMON,
                              f"trainer.augment_on_device={flag}", run_dir=run)
        pretrain.run(cfg)
        states.append(last(run))
    assert_bitwise(*states)
    shutil.rmtree(tmp_path)
