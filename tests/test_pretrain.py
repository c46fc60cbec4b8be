"""End to end: `pretrain.run` on synthetic data, resume, 2-process torchrun, `evaluate.run`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import compose_cfg, tiny_method_overrides
from vfm import evaluate, pretrain
from vfm.config import CONF_DIR, ConfigError
from vfm.engine.trainer import NonFiniteLossError


def test_pretrain_run_writes_the_run_directory(tiny_cfg, tmp_path):
    cfg = tiny_cfg()
    metrics = pretrain.run(cfg)
    run = Path(cfg.paths.output_dir)
    for name in ["config.yaml", "metrics.json", "encoder.safetensors", "checkpoints/last.pt"]:
        assert (run / name).is_file(), name
    assert list((run / "tb").glob("events.out.tfevents.*"))
    assert sorted(p.name for p in (run / "viz").glob("*.png")) == ["attention_epoch0002.png", "pca_epoch0002.png"]
    for key in ["knn/top1", "linear/top1", "baseline/knn/top1", "baseline/linear/top1", "train/final_loss"]:
        assert key in metrics, key
    assert json.loads((run / "metrics.json").read_text())["metrics"]["knn/top1"] == metrics["knn/top1"]
    state = torch.load(run / "checkpoints" / "last.pt", weights_only=False)
    assert state["step"] == metrics["train/steps"] > 0
    assert {"model", "optimizer", "scaler", "rng", "config", "encoder_prefix"} <= set(state)
    assert "loss_fn.center" in state["model"]  # the DINO center is part of the state


METHODS = sorted(p.stem for p in (Path(CONF_DIR) / "method").glob("*.yaml"))


@pytest.mark.parametrize("method", METHODS)
def test_every_method_config_trains_end_to_end(method, tiny_method_cfg):
    evaluators = "evaluator=[knn,zero_shot]" if method == "clip" else "evaluator=[knn]"
    cfg = tiny_method_cfg(method, "trainer.max_epochs=1", "eval.baseline=false", evaluators)
    metrics = pretrain.run(cfg)
    assert metrics["train/steps"] == 8 and 0 <= metrics["knn/top1"] <= 100
    if method == "clip":
        assert 0 <= metrics["zero_shot/top1"] <= 100
    run = Path(cfg.paths.output_dir)
    if method == "mae":  # reconstructions next to the attention maps
        assert (run / "viz" / "reconstruction_epoch0001.png").is_file()
    if method in ("vq_tokenizer", "vqkd"):  # the tokenizer file BEiT reads, and its codebook usage
        assert (run / "tokenizer.pt").is_file()
        assert 0 < metrics["tokenizer/code_usage"] <= 1 and 1 <= metrics["tokenizer/perplexity"] <= 16


@pytest.mark.parametrize("method", ["dino", "ibot", "dinov2", "mae", "vq_tokenizer", "beit", "eva", "clip", "supervised"])
def test_interrupted_then_resumed_equals_uninterrupted(method, tiny_method_cfg, tmp_path):
    # drop_path draws from the global RNG: the resumed run must restore it to match
    common = ("trainer.precision=fp32", "evaluator=[]", "eval.baseline=false", "logger=none", "backbone.drop_path_rate=0.2")
    full = tiny_method_cfg(method, *common, run_dir=tmp_path / "full")
    pretrain.run(full)
    # stop mid-epoch (8 steps per epoch here), then run the same command again in the same directory
    part = tiny_method_cfg(method, *common, "trainer.max_steps=5", run_dir=tmp_path / "part")
    pretrain.run(part)
    assert torch.load(tmp_path / "part/checkpoints/last.pt", weights_only=False)["step"] == 5
    pretrain.run(tiny_method_cfg(method, *common, run_dir=tmp_path / "part"))
    a = torch.load(tmp_path / "full/checkpoints/last.pt", weights_only=False)
    b = torch.load(tmp_path / "part/checkpoints/last.pt", weights_only=False)
    assert a["step"] == b["step"] == 16
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    sa, sb = a["optimizer"]["state"], b["optimizer"]["state"]
    assert all(torch.equal(sa[i]["exp_avg"], sb[i]["exp_avg"]) for i in sa)


def test_periodic_eval_and_accumulation(tiny_cfg, tmp_path):
    # global batch 64 as 2 micro-batches of 32: same steps and the same lr rule as without accumulation
    run = tmp_path / "acc"
    cfg = tiny_cfg("trainer.accum_steps=2", "eval.every_n_epochs=1", "eval.baseline=false", "evaluator=[knn]",
                   "logger=none", run_dir=run)
    metrics = pretrain.run(cfg)
    state = torch.load(run / "checkpoints/last.pt", weights_only=False)
    assert metrics["train/steps"] == state["step"] == 16
    assert "* 64 / 256" in state["lr_rule"]
    # evaluated after epoch 1 during training; the last epoch's evaluation is the final one
    assert "knn/top1" in state["history"][0] and "knn/top1" not in state["history"][1]


def test_non_finite_loss_stops_with_step(tiny_cfg):
    with pytest.raises(NonFiniteLossError, match=r"at step \d+ \(epoch 1\)"):
        pretrain.run(tiny_cfg("optim.blr=nan", "evaluator=[]", "logger=none"))


def test_evaluate_checkpoint_exported_and_random(tiny_cfg, tmp_path):
    cfg = tiny_cfg("trainer.max_epochs=1", "eval.baseline=false", "logger=none", "trainer.precision=fp32")
    metrics = pretrain.run(cfg)
    run = Path(cfg.paths.output_dir)
    # fp32: timm's fused attention and our plain-op attention agree to ~1e-6 (bf16 would flip neighbours)
    common = ["dataset=synthetic", "trainer.progress=false", "trainer.device=cpu", "logger=none", "trainer.precision=fp32"]
    m_ckpt = evaluate.run(compose_cfg(common + [f"checkpoint={run}/checkpoints/last.pt"], tmp_path / "e1", "evaluate"))
    m_st = evaluate.run(compose_cfg(common + [f"checkpoint={run}/encoder.safetensors"], tmp_path / "e2", "evaluate"))
    assert m_ckpt["knn/top1"] == pytest.approx(metrics["knn/top1"], abs=1e-6)
    assert m_st["knn/top1"] == pytest.approx(metrics["knn/top1"], abs=1e-6)
    rnd = evaluate.run(compose_cfg(common + ["checkpoint=random", "backbone.patch_size=7",
                                            "+backbone.model_kwargs={depth: 2, embed_dim: 32, num_heads: 2}"],
                                   tmp_path / "e3", "evaluate"))
    assert set(rnd) >= {"knn/top1", "linear/top1"}
    assert load_file(str(run / "encoder.safetensors"))  # plain tensors, loadable without vfm


@pytest.mark.slow
@pytest.mark.parametrize("method", ["dino", "ibot", "dinov2", "mae", "vq_tokenizer", "beit", "eva", "clip", "supervised"])
def test_two_process_gloo_torchrun(method, tmp_path, mim_artifacts):
    run = tmp_path / "ddp"
    extra = ["method.centering=sinkhorn_knopp"] if method == "dinov2" else []
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "vfm.pretrain", *tiny_method_overrides(method, mim_artifacts), *extra, "trainer.max_epochs=1",
           "eval.baseline=false", f"hydra.run.dir={run}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    state = torch.load(run / "checkpoints/last.pt", weights_only=False)
    # 512 images / global batch 64 = 8 steps whatever the process count (32 per process)
    assert state["step"] == 8
    assert "2 process(es) x 32 images" in (run / "pretrain.log").read_text()
    assert "knn/top1" in json.loads((run / "metrics.json").read_text())["metrics"]


def test_evaluate_zero_shot_on_a_clip_checkpoint(tiny_method_cfg, tmp_path):
    cfg = tiny_method_cfg("clip", "trainer.max_epochs=1", "eval.baseline=false", "evaluator=[zero_shot]",
                          "trainer.precision=fp32")
    metrics = pretrain.run(cfg)
    run = Path(cfg.paths.output_dir)
    common = ["dataset=synthetic_captions", "trainer.progress=false", "trainer.device=cpu", "logger=none",
              "trainer.precision=fp32", "evaluator=[zero_shot]"]
    out = evaluate.run(compose_cfg(common + [f"checkpoint={run}"], tmp_path / "e1", "evaluate"))
    assert out["zero_shot/top1"] == pytest.approx(metrics["zero_shot/top1"], abs=1e-6)
    # a non-CLIP checkpoint: a clear error, not a crash
    dino = tiny_method_cfg("dino", "trainer.max_epochs=1", "eval.baseline=false", "evaluator=[]", run_dir=tmp_path / "d")
    pretrain.run(dino)
    with pytest.raises(ConfigError, match="image-text checkpoint"):
        evaluate.run(compose_cfg(common + [f"checkpoint={tmp_path / 'd'}"], tmp_path / "e2", "evaluate"))
