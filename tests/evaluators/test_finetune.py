"""Full fine-tuning evaluator: layer-wise lr decay groups, drop path, learning, model selection on
val (never test), determinism, resume from its checkpoint, ResNet / plain timm encoders, config."""

from __future__ import annotations

import inspect
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf
from timm.layers import DropPath
from torch import nn

from vfm.backbones import Backbone
from vfm.data.datasets import DataSplits, TensorImageDataset
from vfm.engine.checkpoint import CheckpointError
from vfm.engine.optim import set_optimizer_values
from vfm.evaluators.finetune import BEST_NAME, CHECKPOINT_NAME, FineTune, FineTuneInterrupted
from vfm.evaluators.protocols import TrainsEncoderEvaluator
from vfm.methods.classifier import set_drop_path

CONF = Path(__file__).resolve().parents[2] / "conf" / "evaluator" / "finetune.yaml"
# The full recipe (mixup + cutmix, drop path, layer decay 0.75, crops) on a from-scratch tiny ViT:
# the tiny model needs a high lr and ~80 steps. 5 epochs x 16 steps robustly reach 100% (checked
# over 6 seeds x 2 mixup settings); each run takes < 1 s on one CPU thread.
LEARN = dict(epochs=5, batch_size=32, blr=0.1, warmup_epochs=0.5, crop_scale=(0.5, 1.0), progress=False)
QUICK = dict(epochs=2, batch_size=32, blr=0.1, warmup_epochs=0.5, crop_scale=(0.5, 1.0), progress=False)


def tiny_vit(seed: int = 0) -> Backbone:
    torch.manual_seed(seed)
    return Backbone("vit_tiny_patch16_224", img_size=16, patch_size=4, in_chans=1,
                    model_kwargs=dict(depth=3, embed_dim=16, num_heads=2))


def levels(n: int, seed: int, size: int = 16) -> TensorImageDataset:
    """Class = brightness level (4 levels, 2 noise std apart per pixel). Invariant to crops,
    flips, mixup and cutmix, so the full augmentation recipe applies unchanged."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 4, (n,), generator=g)
    img = 50 + 50 * y.view(-1, 1, 1, 1).float() + 25 * torch.randn(n, 1, size, size, generator=g)
    return TensorImageDataset(img.clamp(0, 255).round().to(torch.uint8), y)


def make_splits(n_train: int = 512, size: int = 16, val: bool = True) -> DataSplits:
    return DataSplits(levels(n_train, 0, size), levels(128, 1, size) if val else None, levels(256, 2, size),
                      img_size=size, in_chans=1, mean=(0.5,), std=(0.25,), num_classes=4)


def state_copy(m: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in m.state_dict().items()}


# ---------------------------------------------------------------------------------------------
# Layer-wise lr decay groups (the helper itself: tests/engine/test_optim.py)
# ---------------------------------------------------------------------------------------------


def test_classifier_param_groups_drive_the_engine_optimizer() -> None:
    """The classifier's groups carry the engine's multipliers: after `set_optimizer_values`, block
    i of L trains at lr * decay ** (L - i), the head at lr, and no weight decay on 1-D parameters,
    biases, the position embedding and [CLS]."""
    model = FineTune(layer_decay=0.5).build_model(tiny_vit(), num_classes=4)
    groups = model.param_groups()
    opt = torch.optim.AdamW(groups, lr=0.0)
    set_optimizer_values(opt, lr=2.0, wd=0.1)
    lr = {n: g["lr"] for g in opt.param_groups for n in g["param_names"]}
    wd = {n: g["weight_decay"] for g in opt.param_groups for n in g["param_names"]}
    p = "backbone.model."
    assert lr[p + "patch_embed.proj.weight"] == pytest.approx(2.0 * 0.5**4) and lr[p + "pos_embed"] == lr[p + "cls_token"]
    assert lr[p + "blocks.0.attn.qkv.weight"] == pytest.approx(2.0 * 0.5**3)
    assert lr[p + "blocks.2.mlp.fc2.bias"] == pytest.approx(2.0 * 0.5)
    assert lr["head.weight"] == lr["head.bias"] == lr[p + "norm.weight"] == 2.0
    assert wd["head.weight"] == wd[p + "blocks.1.attn.qkv.weight"] == 0.1
    assert wd["head.bias"] == wd[p + "pos_embed"] == wd[p + "cls_token"] == wd[p + "blocks.1.norm1.weight"] == 0.0
    assert sorted(id(q) for g in groups for q in g["params"]) == sorted(id(q) for q in model.parameters())

    # full fine-tuning trains what pretraining froze (MAE's fixed sin-cos position embedding)
    enc = tiny_vit()
    enc.use_fixed_sincos_pos_embed()
    names = {n for g in FineTune().build_model(enc, num_classes=4).param_groups() for n in g["param_names"]}
    assert p + "pos_embed" in names and not enc.model.pos_embed.requires_grad


# ---------------------------------------------------------------------------------------------
# Drop path
# ---------------------------------------------------------------------------------------------


def test_drop_path_linear_on_the_copy_only() -> None:
    enc = tiny_vit()
    model = FineTune(drop_path=0.2).build_model(enc, num_classes=4)
    rates = [(b.drop_path1.drop_prob, b.drop_path2.drop_prob) for b in model.encoder.model.blocks]
    assert rates == [pytest.approx((r, r)) for r in (0.0, 0.1, 0.2)]
    assert all(isinstance(b.drop_path1, DropPath) for b in model.encoder.model.blocks)
    # the caller's encoder (built with drop_path_rate=0) keeps its Identity slots
    assert all(isinstance(b.drop_path1, nn.Identity) for b in enc.model.blocks)
    # and the weights start equal, but are not shared
    assert torch.equal(model.encoder.model.pos_embed, enc.model.pos_embed)
    assert model.encoder.model.pos_embed.data_ptr() != enc.model.pos_embed.data_ptr()

    resnet = Backbone("resnet18", in_chans=1)
    rates = set_drop_path(resnet, 0.7)
    assert rates == pytest.approx([0.1 * i for i in range(8)])  # 8 basic blocks, timm's rule
    assert [m.drop_prob for m in resnet.modules() if isinstance(m, DropPath)] == pytest.approx(rates)


# ---------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------


def test_learns_and_leaves_encoder_untouched(caplog: pytest.LogCaptureFixture) -> None:
    enc = tiny_vit()
    before = state_copy(enc)
    flags = [p.requires_grad for p in enc.parameters()]
    torch_rng, np_rng = torch.get_rng_state(), np.random.get_state()
    with caplog.at_level(logging.INFO, logger="vfm.evaluators.finetune"):
        m = FineTune(**LEARN)(enc, make_splits())
    assert set(m) == {"finetune/val_top1", "finetune/best_epoch", "finetune/top1", "finetune/train_loss"}
    assert m["finetune/top1"] > 90.0 and m["finetune/val_top1"] > 90.0
    assert 1 <= m["finetune/best_epoch"] <= LEARN["epochs"]
    assert "finetune (5 epochs, train=512" in caplog.text
    after = enc.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert [p.requires_grad for p in enc.parameters()] == flags and enc.training
    # the caller's RNG streams are not consumed
    assert torch.equal(torch.get_rng_state(), torch_rng)
    assert all(np.array_equal(a, b) for a, b in zip(np.random.get_state(), np_rng, strict=True))


def test_selects_on_val_and_evaluates_test_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """Scripted val accuracies peak at epoch 2: those weights must be the ones tested, the test
    split touched exactly once, after training, and shuffled test labels change nothing else."""
    splits = make_splits(n_train=256)
    calls: list[tuple[str, torch.Tensor]] = []
    real = FineTune._evaluate
    scripted = iter([40.0, 90.0, 70.0] * 2)

    def spy(self, model, dataset, splits_, device, *, desc):
        which = "val" if dataset is splits_.val else "test" if dataset is splits_.test else "?"
        calls.append((which, model.head.weight.detach().clone()))
        return (next(scripted), float("nan")) if which == "val" else real(self, model, dataset, splits_, device, desc=desc)

    monkeypatch.setattr(FineTune, "_evaluate", spy)
    ft = FineTune(**{**QUICK, "epochs": 3})
    a = ft(tiny_vit(), splits)
    assert [c[0] for c in calls] == ["val", "val", "val", "test"]
    assert a["finetune/best_epoch"] == 2.0 and a["finetune/val_top1"] == 90.0
    assert torch.equal(calls[3][1], calls[1][1])  # tested with epoch 2's weights
    assert not torch.equal(calls[3][1], calls[2][1])

    g = torch.Generator().manual_seed(5)
    shuffled = TensorImageDataset(splits.test.images, splits.test.labels[torch.randperm(256, generator=g)])
    calls.clear()
    b = ft(tiny_vit(), DataSplits(splits.train, splits.val, shuffled, 16, 1, (0.5,), (0.25,), 4))
    assert [c[0] for c in calls] == ["val", "val", "val", "test"]
    for key in ("finetune/best_epoch", "finetune/val_top1", "finetune/train_loss"):
        assert b[key] == a[key], key
    assert b["finetune/top1"] != a["finetune/top1"]


def test_no_val_split_holds_out_train(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="vfm.evaluators.finetune"):
        m = FineTune(**{**QUICK, "epochs": 1})(tiny_vit(), make_splits(n_train=200, val=False))
    assert "holding out 20 training samples" in caplog.text
    assert "finetune/val_top1" in m and "finetune/top1" in m
    last = FineTune(**{**QUICK, "epochs": 1, "select_on": "last"})(tiny_vit(), make_splits(n_train=200, val=False))
    assert "finetune/val_top1" not in last and last["finetune/best_epoch"] == 1.0


def test_same_seed_same_metrics() -> None:
    splits = make_splits(n_train=256)
    a = FineTune(**QUICK, seed=3)(tiny_vit(), splits)
    b = FineTune(**QUICK, seed=3)(tiny_vit(), splits)
    c = FineTune(**QUICK, seed=4)(tiny_vit(), splits)
    assert a == b
    assert c["finetune/train_loss"] != a["finetune/train_loss"]


def test_plain_timm_model_and_no_mixup() -> None:
    """Exported weights come back as a plain timm model (``.num_features``, no Backbone)."""
    enc = tiny_vit().model
    m = FineTune(**{**QUICK, "epochs": 1, "mixup": 0.0, "cutmix": 0.0, "precision": "fp32"})(enc, make_splits(256))
    assert all(np.isfinite(v) for v in m.values())


def test_resnet() -> None:
    enc = Backbone("resnet18", in_chans=1)
    before = state_copy(enc)  # includes the BatchNorm running stats
    splits = make_splits(n_train=64, size=32)
    m = FineTune(**{**QUICK, "epochs": 1})(enc, splits)
    assert {"finetune/top1", "finetune/val_top1", "finetune/best_epoch"} <= set(m)
    assert all(np.isfinite(v) for v in m.values())
    assert all(torch.equal(before[k], v) for k, v in enc.state_dict().items())


# ---------------------------------------------------------------------------------------------
# Resume and data parallelism
# ---------------------------------------------------------------------------------------------


def load_ckpt(directory: Path) -> dict:
    return torch.load(directory / CHECKPOINT_NAME, map_location="cpu", weights_only=False)


def test_interrupted_then_resumed_is_bitwise_uninterrupted(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """The full recipe (crops, mixup/cutmix, drop path, layer decay, warmup + cosine) in fp32:
    stopped after epoch 1, resumed and stopped after epoch 2, resumed to the end, it ends with the
    uninterrupted run's metrics and bitwise its weights and optimizer state."""
    splits = make_splits(n_train=256)
    kw = {**QUICK, "epochs": 3, "precision": "fp32", "drop_path": 0.1}
    full = FineTune(**kw)(tiny_vit(), splits, checkpoint_dir=tmp_path / "full")
    assert FineTune(**kw)(tiny_vit(), splits) == full  # saving changes nothing

    part = tmp_path / "part"
    with pytest.raises(FineTuneInterrupted, match=r"after epoch 1/3 \(stop_after_epoch=1\)"):
        FineTune(**kw, stop_after_epoch=1)(tiny_vit(), splits, checkpoint_dir=part)
    assert load_ckpt(part)["epoch"] == 1
    with pytest.raises(FineTuneInterrupted, match="after epoch 2/3"):
        FineTune(**kw, stop_after_epoch=2)(tiny_vit(), splits, checkpoint_dir=part)
    assert load_ckpt(part)["epoch"] == 2
    with caplog.at_level(logging.INFO, logger="vfm.evaluators.finetune"):
        resumed = FineTune(**kw)(tiny_vit(), splits, checkpoint_dir=part)
    assert "resuming from" in caplog.text and "after epoch 2/3" in caplog.text
    assert resumed == full

    a, b = load_ckpt(tmp_path / "full"), load_ckpt(part)
    val_hist = [[h["finetune/val_top1"] for h in c["history"]] for c in (a, b)]
    assert a["epoch"] == b["epoch"] == 3 and len(val_hist[0]) == 3 and val_hist[0] == val_hist[1]
    best_a, best_b = (torch.load(d / BEST_NAME, weights_only=False) for d in (tmp_path / "full", part))
    assert best_a["epoch"] == best_b["epoch"] == full["finetune/best_epoch"]
    for x, y in ((a, b), (best_a, best_b)):  # the last and the selected weights
        assert x["model"].keys() == y["model"].keys()
        for k in x["model"]:
            assert torch.equal(x["model"][k], y["model"][k]), k
    sa, sb = a["optimizer"]["state"], b["optimizer"]["state"]
    assert sa.keys() == sb.keys()
    assert all(torch.equal(sa[i]["exp_avg"], sb[i]["exp_avg"]) and torch.equal(sa[i]["exp_avg_sq"], sb[i]["exp_avg_sq"])
               for i in sa)

    # every epoch done: a further call only tests the selected weights, with the same result
    calls: list[str] = []
    real_evaluate = FineTune._evaluate

    def spy(self, model, dataset, splits_, device, *, desc):
        calls.append(desc)
        return real_evaluate(self, model, dataset, splits_, device, desc=desc)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(FineTune, "_evaluate", spy)
        assert FineTune(**kw)(tiny_vit(), splits, checkpoint_dir=part) == full
    assert calls == ["finetune/test"]


def test_mismatched_checkpoint_is_refused(tmp_path: Path) -> None:
    splits = make_splits(n_train=128)
    kw = {**QUICK, "epochs": 2}
    with pytest.raises(FineTuneInterrupted):
        FineTune(**kw, stop_after_epoch=1)(tiny_vit(), splits, checkpoint_dir=tmp_path)
    with pytest.raises(CheckpointError, match=r"refusing to resume .*epochs: 2 in the checkpoint, 3 now.*Delete"):
        FineTune(**{**kw, "epochs": 3})(tiny_vit(), splits, checkpoint_dir=tmp_path)
    with pytest.raises(CheckpointError, match=r"blr: 0\.1 in the checkpoint, 0\.2 now"):
        FineTune(**{**kw, "blr": 0.2})(tiny_vit(), splits, checkpoint_dir=tmp_path)
    # same architecture and parameter count, other weights (e.g. a longer pretraining run)
    with pytest.raises(CheckpointError, match="encoder_digest"):
        FineTune(**kw)(tiny_vit(seed=1), splits, checkpoint_dir=tmp_path)
    # the matching settings still resume
    assert FineTune(**kw)(tiny_vit(), splits, checkpoint_dir=tmp_path)["finetune/best_epoch"] in (1.0, 2.0)

    other = tmp_path / "other" / CHECKPOINT_NAME
    other.parent.mkdir(parents=True)
    # e.g. a pretrain last.pt: a training checkpoint, not of a fine-tuning
    torch.save({"model": {}, "optimizer": {}, "scaler": {}, "step": 8, "epoch": 1, "rng": {}}, other)
    with pytest.raises(CheckpointError, match="not a fine-tuning checkpoint"):
        FineTune(**kw)(tiny_vit(), splits, checkpoint_dir=tmp_path / "other")
    with pytest.raises(ValueError, match="stop_after_epoch needs a checkpoint_dir"):
        FineTune(**kw, stop_after_epoch=1)(tiny_vit(), splits)


def test_global_batch_must_split_over_processes(monkeypatch: pytest.MonkeyPatch) -> None:
    """Checked before any collective, so every process fails alike with the fix in the message."""
    import vfm.evaluators.finetune as ft_module

    monkeypatch.setattr(ft_module.vdist, "get_world_size", lambda: 4)
    with pytest.raises(ValueError, match=r"batch_size=30 .* over 4 processes; use a multiple of 4"):
        FineTune(**{**QUICK, "batch_size": 30, "mixup": 0.0, "cutmix": 0.0})(tiny_vit(), make_splits(64))
    with pytest.raises(ValueError, match=r"batch_size=36 .* even number of images per process.*multiple of 8"):
        FineTune(**{**QUICK, "batch_size": 36})(tiny_vit(), make_splits(64))


# Under torchrun: the evaluator called by every process, as `evaluate` does.
TORCHRUN_SCRIPT = """
import json, sys
sys.path.insert(0, {tests!r})
from test_finetune import DATA_PARALLEL, make_splits, tiny_vit
from vfm import distributed as vdist
from vfm.evaluators.finetune import FineTune
vdist.init_distributed("cpu")
out = FineTune(**DATA_PARALLEL, strategy=sys.argv[1])(tiny_vit(), make_splits(n_train=256), checkpoint_dir=sys.argv[2])
with open(sys.argv[2] + f"/metrics_rank{{vdist.get_rank()}}.json", "w") as f:
    json.dump(out, f)
vdist.destroy()
"""
# Without per-process random draws (each process seeds its own crops, flips, mixup and drop path):
# full-image crops, no flip, no mixup, no drop path, fp32. Then one process and two see the same
# global batches and only the float summation order of the gradients differs.
DATA_PARALLEL = dict(epochs=2, batch_size=32, blr=0.01, warmup_epochs=0.5, crop_scale=(1.0, 1.0), flip_p=0.0,
                     mixup=0.0, cutmix=0.0, drop_path=0.0, precision="fp32", progress=False)


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_processes_train_like_one(strategy: str, tmp_path: Path) -> None:
    """2-process gloo torchrun (DDP, or FSDP: the engine's strategies) ends where one process does:
    the same weights up to float summation order, the same selection and metrics on every rank."""
    import json
    import os
    import subprocess
    import sys

    script = tmp_path / "finetune_torchrun.py"
    script.write_text(TORCHRUN_SCRIPT.format(tests=str(Path(__file__).parent)))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script),
           strategy, str(tmp_path / "two")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"two/metrics_rank{r}.json").read_text()) for r in range(2)]
    assert ranks[0] == ranks[1]  # every process returns rank 0's metrics
    one = FineTune(**DATA_PARALLEL)(tiny_vit(), make_splits(n_train=256), checkpoint_dir=tmp_path / "one")
    two = ranks[0]
    a, b = load_ckpt(tmp_path / "two"), load_ckpt(tmp_path / "one")
    assert (a["world_size"], b["world_size"], a["epoch"], b["epoch"]) == (2, 1, 2, 2)
    assert a["model"].keys() == b["model"].keys()
    for k in a["model"]:
        torch.testing.assert_close(a["model"][k], b["model"][k], rtol=0, atol=1e-5, msg=k)
    assert two["finetune/train_loss"] == pytest.approx(one["finetune/train_loss"], abs=1e-5)
    assert two["finetune/best_epoch"] == one["finetune/best_epoch"]
    for key in ("finetune/val_top1", "finetune/top1"):  # at most one borderline image may flip
        assert two[key] == pytest.approx(one[key], abs=100 / 128 + 1e-9), key


# ---------------------------------------------------------------------------------------------
# Config
# ---------------------------------------------------------------------------------------------


def test_yaml_matches_constructor() -> None:
    cfg = OmegaConf.load(CONF)
    params = set(inspect.signature(FineTune).parameters) - {"device", "progress"}
    assert set(cfg) - {"_target_"} == params
    ft = instantiate(cfg, device="cpu", progress=False)
    assert isinstance(ft, FineTune) and isinstance(ft, TrainsEncoderEvaluator)
    assert ft.crop_scale == (0.08, 1.0) and all(isinstance(s, float) for s in ft.crop_scale)
    defaults = {n: p.default for n, p in inspect.signature(FineTune).parameters.items()}
    for key in cfg:
        if key != "_target_":
            assert (tuple(cfg[key]) if key == "crop_scale" else cfg[key]) == defaults[key], key
