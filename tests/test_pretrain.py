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

from conftest import TINY, compose_cfg, tiny_method_overrides
from vfm import evaluate, pretrain
from vfm.config import CONF_DIR, ConfigError
from vfm.engine.trainer import NonFiniteLossError
from vfm.evaluators.finetune import FineTuneInterrupted


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


@pytest.mark.parametrize("method", ["dino", "ibot", "dinov2", "mae", "vq_tokenizer", "beit", "eva", "clip", "supervised", "siglip", "distill", "ijepa"])
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


def test_periodic_eval_reports_validation_only_and_accumulation(tiny_cfg, tmp_path):
    # global batch 64 as 2 micro-batches of 32: same steps and the same lr rule as without accumulation
    run = tmp_path / "acc"
    cfg = tiny_cfg("trainer.accum_steps=2", "eval.every_n_epochs=1", "eval.baseline=false", "evaluator=[knn,linear]",
                   "evaluator.linear.epochs=1", "logger=none", run_dir=run)
    metrics = pretrain.run(cfg)
    state = torch.load(run / "checkpoints/last.pt", weights_only=False)
    assert metrics["train/steps"] == state["step"] == 16
    assert "* 64 / 256" in state["lr_rule"]
    # evaluated after epoch 1 during training (eval.periodic: kNN alone, on val: the test split is not
    # read; these metrics are what the log and TensorBoard's eval/ get); the last epoch's
    # evaluation is the final one, test included
    assert set(k for k in state["history"][0] if "/" in k) == {"knn/val_top1"}
    assert "knn/val_top1" not in state["history"][1] and {"knn/top1", "linear/top1"} <= set(metrics)
    # the curve: epoch 1 as evaluated then, epoch 2 the final evaluation's validation value
    curve = json.loads((run / "curves.json").read_text())
    assert curve == [{"epoch": 1, "step": 8, "metrics": {"knn/val_top1": state["history"][0]["knn/val_top1"]}},
                     {"epoch": 2.0, "step": 16, "metrics": {"knn/val_top1": metrics["knn/val_top1"]}}]


def test_non_finite_loss_stops_with_step(tiny_cfg):
    with pytest.raises(NonFiniteLossError, match=r"at step \d+ \(epoch 1\)"):
        # a learning rate so high that the weights overflow (optim.blr=nan no longer passes validation)
        pretrain.run(tiny_cfg("optim.blr=1e30", "evaluator=[]", "logger=none"))


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
@pytest.mark.parametrize("method", ["dino", "ibot", "dinov2", "mae", "vq_tokenizer", "beit", "eva", "clip", "supervised", "siglip", "distill", "ijepa"])
def test_two_process_gloo_torchrun(method, tmp_path, mim_artifacts):
    run = tmp_path / "ddp"
    extra = ["method.centering=sinkhorn_knopp"] if method == "dinov2" else []
    # VFM_TEST_STRATEGY=fsdp runs every method sharded (the default suite covers FSDP in tests/engine/test_fsdp.py)
    extra.append(f"trainer.strategy={os.environ.get('VFM_TEST_STRATEGY', 'ddp')}")
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


# Fine-tuning small enough for tests: 2 epochs of 8 steps of 64 images on the tiny ViT, fp32.
FINETUNE = ["evaluator=[finetune]", "evaluator.finetune.epochs=2", "evaluator.finetune.batch_size=64",
            "evaluator.finetune.precision=fp32", "+evaluator.finetune.progress=false"]


def test_finetune_in_pretrain_and_evaluate_resumes(tiny_cfg, tmp_path):
    cfg = tiny_cfg("trainer.max_epochs=1", "eval.baseline=false", "logger=none", "trainer.precision=fp32", *FINETUNE)
    metrics = pretrain.run(cfg)
    run = Path(cfg.paths.output_dir)
    assert torch.load(run / "eval/finetune/checkpoints/last.pt", weights_only=False)["epoch"] == 2
    # the same command again: pretraining and fine-tuning are both done, and are resumed as such
    again = pretrain.run(cfg)
    assert {k: again[k] for k in metrics if k.startswith("finetune/")} == {k: v for k, v in metrics.items() if k.startswith("finetune/")}

    common = ["dataset=synthetic", "trainer.progress=false", "trainer.device=cpu", "logger=none",
              f"checkpoint={run}/checkpoints/last.pt", *FINETUNE]
    e1 = tmp_path / "e1"
    with pytest.raises(FineTuneInterrupted, match="after epoch 1/2"):
        evaluate.run(compose_cfg(common + ["evaluator.finetune.stop_after_epoch=1"], e1, "evaluate"))
    assert torch.load(e1 / "finetune/checkpoints/last.pt", weights_only=False)["epoch"] == 1
    assert not (e1 / "metrics.json").exists()
    resumed = evaluate.run(compose_cfg(common, e1, "evaluate"))
    full = evaluate.run(compose_cfg(common, tmp_path / "e2", "evaluate"))
    assert set(full) == {"finetune/top1", "finetune/val_top1", "finetune/best_epoch", "finetune/train_loss"}
    assert resumed == full
    # the encoder from last.pt is pretrain's own, bitwise: its final fine-tuning gave the same
    assert full == {k: metrics[k] for k in full}
    # every epoch done: the same command only tests the selected weights again
    assert evaluate.run(compose_cfg(common, e1, "evaluate")) == full
    assert json.loads((e1 / "metrics.json").read_text())["metrics"] == full


@pytest.mark.slow
def test_evaluate_finetune_two_process_gloo_torchrun(tiny_cfg, tmp_path):
    """DDP fine-tuning under torchrun, interrupted and resumed, ends where one uninterrupted process
    does on the same global batches: without crops, flips, mixup and drop path (each process draws
    its own) and in fp32, only the float summation order of the gradients differs."""
    cfg = tiny_cfg("trainer.max_epochs=1", "eval.baseline=false", "logger=none", "evaluator=[]", "trainer.precision=fp32")
    pretrain.run(cfg)
    ft = ["dataset=synthetic", "trainer.progress=false", "trainer.device=cpu", "logger=none",
          f"checkpoint={cfg.paths.output_dir}/checkpoints/last.pt", *FINETUNE,
          "evaluator.finetune.mixup=0.0", "evaluator.finetune.cutmix=0.0", "evaluator.finetune.drop_path=0.0",
          "evaluator.finetune.crop_scale=[1.0,1.0]", "evaluator.finetune.flip_p=0.0",  # full images, no flip
          # an lr at which it learns over 32 steps
          "evaluator.finetune.epochs=4", "evaluator.finetune.blr=0.01", "evaluator.finetune.warmup_epochs=0.5"]
    ddp = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "vfm.evaluate", *ft, f"hydra.run.dir={ddp}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    # interrupted after epoch 2 (both processes stop, exit code 3), then the same command resumes
    proc = subprocess.run([*cmd, "evaluator.finetune.stop_after_epoch=2"], capture_output=True, text=True,
                          timeout=300, env=env)
    assert proc.returncode != 0 and "finetune stopped after epoch 2/4" in proc.stderr, proc.stderr[-3000:]
    assert torch.load(ddp / "finetune/checkpoints/last.pt", weights_only=False)["epoch"] == 2
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    two = json.loads((ddp / "metrics.json").read_text())["metrics"]
    assert set(two) == {"finetune/top1", "finetune/val_top1", "finetune/best_epoch", "finetune/train_loss"}
    log_text = (ddp / "evaluate.log").read_text()
    assert "batch 64 = 2 x 32" in log_text and "resuming from" in log_text

    one = evaluate.run(compose_cfg(ft, tmp_path / "one", "evaluate"))
    a = torch.load(ddp / "finetune/checkpoints/last.pt", weights_only=False)
    b = torch.load(tmp_path / "one/finetune/checkpoints/last.pt", weights_only=False)
    assert (a["world_size"], b["world_size"], a["epoch"], b["epoch"]) == (2, 1, 4, 4)
    assert a["model"].keys() == b["model"].keys()
    for k in a["model"]:
        torch.testing.assert_close(a["model"][k], b["model"][k], rtol=0, atol=1e-5, msg=k)
    assert two["finetune/train_loss"] == pytest.approx(one["finetune/train_loss"], abs=1e-5)
    assert two["finetune/best_epoch"] == one["finetune/best_epoch"]
    for key in ("finetune/val_top1", "finetune/top1"):  # at most one of 128 borderline images may flip
        assert two[key] == pytest.approx(one[key], abs=100 / 128 + 1e-9), key


@pytest.mark.slow
def test_two_process_pretrain_finetunes_on_rank_0_alone(tmp_path):
    """pretrain's final evaluation runs on rank 0 while the other process waits at a barrier: the
    fine-tuning there must train alone, not wait for a DDP partner (a hang before the fix)."""
    run = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "vfm.pretrain",
           *TINY, "trainer.max_epochs=1", "eval.baseline=false", *FINETUNE, f"hydra.run.dir={run}"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=180, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "finetune/top1" in json.loads((run / "metrics.json").read_text())["metrics"]
    assert torch.load(run / "eval/finetune/checkpoints/last.pt", weights_only=False)["world_size"] == 1


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


def test_random_init_baseline_is_the_encoder_before_training(tiny_method_cfg):
    from vfm.backbones import sincos_pos_embed_2d

    for method in ("dino", "mae"):
        cfg = tiny_method_cfg(method)
        a, b = pretrain.build_random_encoder(cfg), pretrain.build_method(cfg).encoder
        assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True))
    # MAE's encoder starts with its fixed sin-cos positions, and so does its baseline
    assert torch.allclose(a.model.pos_embed[0, 1:], sincos_pos_embed_2d(32, 4, 4))


def test_the_command_names_its_config_files_and_backbone(tmp_path):
    """`pretrain` (a real command: Hydra's record of it) lists every config file applied, presets
    included, and the backbone as built, in its log and in metrics.json."""
    run = tmp_path / "cli"
    # recipe=dino_fashion_mnist: the default's preset, here on synthetic data (no dino_synthetic recipe)
    cmd = [sys.executable, "-m", "vfm.pretrain", *TINY, "recipe=dino_fashion_mnist", "trainer.max_steps=1",
           "evaluator=[]", "eval.baseline=false", "logger=none", f"hydra.run.dir={run}"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    files = ["paths/default.yaml", "backbone/vit_tiny_d6.yaml", "method/dino.yaml", "dataset/synthetic.yaml",
             "optim/adamw.yaml", "optim/dino.yaml", "trainer/default.yaml", "logger/none.yaml", "pretrain.yaml",
             "recipe/dino_fashion_mnist.yaml"]
    out = json.loads((run / "metrics.json").read_text())
    assert out["config_files"] == files
    assert "recipe=dino_fashion_mnist" in out["overrides"]
    # the default backbone's timm name with what the overrides made of it
    assert out["backbone"] == {"timm_name": "vit_tiny_patch16_224", "depth": 2, "embed_dim": 32, "num_heads": 2,
                               "patch_size": 7, "img_size": 28, "in_chans": 1, "params": out["backbone"]["params"]}
    assert out["backbone"]["params"] > 0
    log_text = (run / "pretrain.log").read_text()
    assert f"config files (in merge order, later ones win): {', '.join(files)}" in log_text
    assert "backbone: vit_tiny_patch16_224 with depth=2, embed_dim=32, num_heads=2, patch_size=7, img_size=28" in log_text


def test_evaluating_during_training_draws_nothing_from_the_random_streams(tmp_path):
    """kNN and the figures of a periodic evaluation use no global random number: a run with
    eval.every_n_epochs trains exactly like one without (drop path and crops draw from them)."""
    import random

    import numpy as np

    from vfm.backbones import Backbone
    from vfm.data.datasets import synthetic
    from vfm.engine.logging import NullLogger
    from vfm.evaluators.knn import KNN
    from vfm.evaluators.suite import run_evaluators

    torch.manual_seed(0)
    encoder = Backbone("vit_tiny_patch16_224", img_size=28, patch_size=7, in_chans=1,
                       model_kwargs={"depth": 1, "embed_dim": 32, "num_heads": 2})
    splits = synthetic(num_train=64, num_val=32, num_test=0)
    before = (torch.get_rng_state(), np.random.get_state()[1].copy(), random.getstate())
    pretrain.visualize(encoder, splits, tmp_path, NullLogger(), epoch=1)
    metrics = run_evaluators(encoder, splits, {"knn": KNN()}, progress=False)
    after = (torch.get_rng_state(), np.random.get_state()[1], random.getstate())
    assert set(metrics) == {"knn/val_top1"} and (tmp_path / "viz" / "attention_epoch0001.png").is_file()
    assert torch.equal(before[0], after[0]) and np.array_equal(before[1], after[1]) and before[2] == after[2]
