"""DINO, DINOv2 and MAE against their official code: the formulas on small inputs (lr scaling,
per-module clipping, uniform stochastic depth, the zero-lr last layer, weight-decay sets, MAE's
initialisation) and the composed paper configs against tables of the official values."""

from __future__ import annotations

import math

import pytest
import torch
from hydra.utils import instantiate
from timm.layers import DropPath
from torch import nn

from conftest import compose_cfg
from vfm.backbones import Backbone
from vfm.engine.optim import OptimSpec, clip_gradients, set_optimizer_values
from vfm.methods.base import timm_no_weight_decay_names
from vfm.methods.classifier import set_drop_path
from vfm.methods.dino import DINO
from vfm.methods.dinov2 import DINOv2
from vfm.methods.mae import MAE
from vfm.methods.supervised import Supervised


def _backbone(depth: int = 3, drop_path_rate: float = 0.1, dim: int = 32) -> Backbone:
    return Backbone("vit_tiny_patch16_224", img_size=28, patch_size=7, in_chans=1, drop_path_rate=drop_path_rate,
                    model_kwargs={"depth": depth, "embed_dim": dim, "num_heads": 2})


def _dinov2(**kw) -> DINOv2:
    return DINOv2(_backbone(), out_dim=64, patch_out_dim=48, hidden_dim=32, bottleneck_dim=16, **kw)


def _drop_rates(backbone: Backbone) -> list[float]:
    return [getattr(getattr(b, a), "drop_prob", 0.0) for b in backbone.model.blocks for a in ("drop_path1", "drop_path2")]


# ------------------------------------------------------------------ formulas
def test_sqrt_wrt_1024_lr_scaling():
    # dinov2 utils/config.py apply_scaling_rules_to_cfg: lr = base_lr * sqrt(batch / 1024)
    spec = OptimSpec(blr=0.004, lr_scaling="sqrt", lr_reference_batch=1024)
    assert spec.peak_lr(2048) == pytest.approx(0.004 * math.sqrt(2.0))
    assert spec.peak_lr(1024) == pytest.approx(0.004)
    assert "sqrt(2048 / 1024)" in spec.lr_rule(2048)
    assert OptimSpec(blr=5e-4).peak_lr(1024) == pytest.approx(2e-3)  # DINO / MAE: blr * batch / 256


def test_per_module_clipping_clips_each_group_to_max_norm():
    a, b, c = (nn.Parameter(torch.zeros(4)) for _ in range(3))
    a.grad, b.grad, c.grad = torch.full((4,), 3.0), torch.full((4,), 4.0), torch.full((4,), 0.5)  # norms 6, 8, 1
    total = clip_gradients([a, b, c], 3.0, "per_module", groups=[[a, b], [c]])
    assert total.item() == pytest.approx(math.sqrt(36 + 64 + 1))  # reported before clipping
    assert torch.linalg.vector_norm(torch.cat([a.grad, b.grad])).item() == pytest.approx(3.0, rel=1e-5)
    assert torch.allclose(a.grad / b.grad, torch.full((4,), 0.75))  # a global norm inside the group
    assert torch.equal(c.grad, torch.full((4,), 0.5))  # under the limit: untouched


def test_dinov2_clip_groups_are_backbone_and_heads():
    for separate, n in ((False, 2), (True, 3)):
        m = _dinov2(separate_heads=separate)
        groups = m.gradient_clip_groups()
        assert len(groups) == n
        assert {id(p) for g in groups for p in g} == {id(p) for p in m.parameters() if p.requires_grad}
        assert {id(p) for p in groups[0]} == {id(p) for p in m.student.backbone.parameters()}


def test_uniform_drop_path_on_every_block():
    m = _dinov2(drop_path_rate=0.3, drop_path_uniform=True)
    assert _drop_rates(m.student.backbone) == [pytest.approx(0.3)] * 6
    assert _drop_rates(m.teacher.backbone) == [0.0] * 6  # the teacher has none
    bb = _backbone(depth=3, drop_path_rate=0.0)
    set_drop_path(bb, 0.2)  # timm's ramp: 0, 0.1, 0.2
    assert _drop_rates(bb) == [0.0, 0.0, pytest.approx(0.1), pytest.approx(0.1), pytest.approx(0.2), pytest.approx(0.2)]
    assert isinstance(bb.model.blocks[2].drop_path1, DropPath)


def test_dinov2_last_layer_zero_lr_keeps_adam_moments():
    torch.manual_seed(0)
    m = _dinov2()
    groups = m.param_groups()
    last = [p for g in groups if g["is_last_layer"] for p in g["params"]]
    assert {id(p) for p in last} == {id(p) for p in m.student.dino_head.last_layer_parameters()}
    opt = OptimSpec().build(groups, "cpu")
    before = [p.detach().clone() for p in last]
    other = m.student.backbone.model.blocks[0].attn.qkv.weight
    other_before = other.detach().clone()
    for p in m.parameters():
        if p.requires_grad:
            p.grad = torch.randn_like(p)
    m.before_optimizer_step(0, {"freeze_last_layer": 1.0})  # no gradient is dropped any more
    assert all(p.grad is not None for p in last)
    set_optimizer_values(opt, lr=1e-3, wd=0.04, last_layer_lr=0.0)  # what the trainer does while frozen
    opt.step()
    assert all(torch.equal(p, b) for p, b in zip(last, before))  # neither step nor weight decay
    assert all(opt.state[p]["exp_avg"].abs().sum() > 0 for p in last)  # the moments accumulate
    assert not torch.equal(other, other_before)


def test_dino_still_drops_last_layer_gradients():
    # official DINO `cancel_gradients_last_layer` sets the gradients to None
    m = DINO(_backbone(), out_dim=64, hidden_dim=32, bottleneck_dim=16, norm_last_layer=False)
    for p in m.parameters():
        if p.requires_grad:
            p.grad = torch.ones_like(p)
    m.before_optimizer_step(0, {"freeze_last_layer": 1.0})
    assert m.student.head.last_layer_v.grad is None and m.student.head.last_layer_g.grad is None


def _no_decay_names(method: nn.Module) -> set[str]:
    ids = {id(p) for g in method.param_groups() if g["wd_mult"] == 0 for p in g["params"]}
    return {n for n, p in method.named_parameters() if id(p) in ids}


def test_no_weight_decay_sets():
    sup = Supervised(_backbone(), num_classes=4, randaugment=None)  # DeiT: timm create_optimizer's skip list
    names = _no_decay_names(sup)
    assert {"backbone.model.cls_token", "backbone.model.pos_embed"} <= names
    assert {"backbone.model.cls_token", "backbone.model.pos_embed"} <= timm_no_weight_decay_names(sup)
    assert "backbone.model.blocks.0.attn.qkv.weight" not in names
    # DINO / DINOv2 `get_params_groups`: only biases and 1-D / norm parameters are exempt
    dino = _no_decay_names(DINO(_backbone(), out_dim=64, hidden_dim=32, bottleneck_dim=16))
    assert "student.backbone.model.cls_token" not in dino and "student.backbone.model.blocks.0.norm1.weight" in dino
    dinov2 = _no_decay_names(_dinov2())
    assert "student.backbone.model.cls_token" not in dinov2 and "student.backbone.model.norm.bias" in dinov2


def test_mae_encoder_init_and_no_drop_path():
    torch.manual_seed(0)
    bb = _backbone(depth=2, drop_path_rate=0.1, dim=64)
    m = MAE(bb, decoder_dim=32, decoder_depth=1, decoder_heads=2)
    assert _drop_rates(m.backbone) == [0.0] * 4
    vit = m.backbone.model

    def xavier_bound(fan_in: int, fan_out: int) -> float:
        return math.sqrt(6.0 / (fan_in + fan_out))

    for lin in (vit.blocks[0].attn.qkv, vit.blocks[1].mlp.fc2):
        out_f, in_f = lin.weight.shape
        bound = xavier_bound(in_f, out_f)
        assert lin.weight.abs().max() <= bound and lin.weight.abs().max() > 0.9 * bound
        assert lin.weight.std().item() == pytest.approx(bound / math.sqrt(3), rel=0.1)
        assert torch.equal(lin.bias, torch.zeros_like(lin.bias))
    w = vit.patch_embed.proj.weight  # [D, C, p, p] as a [D, C*p*p] matrix
    bound = xavier_bound(w[0].numel(), w.shape[0])
    assert w.abs().max() <= bound and w.abs().max() > 0.9 * bound
    assert vit.cls_token.std().item() == pytest.approx(0.02, rel=0.3)
    assert torch.equal(vit.blocks[0].norm1.weight, torch.ones(64))
    assert all(n.eps == 1e-6 for n in m.decoder.modules() if isinstance(n, nn.LayerNorm))  # partial(LayerNorm, eps=1e-6)
    kept = MAE(_backbone(), decoder_dim=32, decoder_depth=1, decoder_heads=2, drop_path_rate=None, init="timm")
    assert max(_drop_rates(kept.backbone)) == pytest.approx(0.1)


# ------------------------------------------------------------------ composed paper configs
def _paper(*overrides: str):
    cfg = compose_cfg(["dataset=imagefolder", "dataset.root=/data", *overrides])
    return cfg, instantiate(cfg.optim)


def _sched(cfg, name):
    return dict(cfg.method.schedules[name])


def test_dino_paper_config_matches_official():
    cfg, optim = _paper("method=dino", "backbone=vit_small")
    m, a = cfg.method, cfg.method.augment
    # facebookresearch/dino README full ViT-S/16 command over main_dino.py defaults
    assert (m.out_dim, m.hidden_dim, m.bottleneck_dim, m.head_layers, m.use_bn_in_head) == (65536, 2048, 256, 3, False)
    assert m.norm_last_layer is False and m.student_temp == 0.1 and m.center_momentum == 0.9
    assert _sched(cfg, "teacher_temp") == {"_target_": "vfm.engine.schedules.WarmupConstant", "start": 0.04,
                                          "value": 0.07, "warmup_epochs": 30}
    assert (_sched(cfg, "teacher_momentum")["base"], _sched(cfg, "freeze_last_layer")["epochs"]) == (0.996, 1)
    assert (a.n_global, a.n_local, a.local_crop_size) == (2, 8, 96)
    assert (list(a.global_scale), list(a.local_scale)) == ([0.4, 1.0], [0.05, 0.4])
    assert cfg.backbone.drop_path_rate == 0.1 and cfg.backbone.patch_size == 16
    assert (optim.blr, optim.lr_scaling, optim.lr_reference_batch, optim.min_lr, optim.warmup_epochs) == (
        0.0005, "linear", 256, 1e-6, 10)
    assert (optim.weight_decay, optim.weight_decay_end, optim.clip_grad, optim.clip_mode) == (0.04, 0.4, 3.0, "per_param")
    assert optim.betas == (0.9, 0.999)
    # the README's 100-epoch vanilla run: main_dino.py defaults
    cfg, optim = _paper("experiment=dino_vit_small_imagenet")
    assert cfg.method.norm_last_layer is True and _sched(cfg, "teacher_temp")["value"] == 0.04
    assert (cfg.trainer.batch_size, cfg.trainer.max_epochs, optim.peak_lr(512)) == (512, 100, pytest.approx(1e-3))


def test_dinov2_paper_config_matches_official():
    cfg, optim = _paper("method=dinov2", "backbone=vit_large")
    m, a = cfg.method, cfg.method.augment
    # dinov2 configs/ssl_default_config.yaml
    assert (m.separate_heads, m.centering, m.out_dim, m.koleo_weight, m.dino_weight, m.ibot_weight) == (
        False, "centering", 65536, 0.1, 1.0, 1.0)
    assert (m.drop_path_rate, m.drop_path_uniform, m.layerwise_decay, m.patch_embed_lr_mult) == (0.3, True, 0.9, 0.2)
    assert m.norm_last_layer is False
    assert (_sched(cfg, "teacher_momentum")["base"], _sched(cfg, "teacher_momentum")["final"]) == (0.992, 1.0)
    for name in ("teacher_temp", "teacher_patch_temp"):
        s = _sched(cfg, name)
        assert (s["start"], s["value"], s["warmup_epochs"]) == (0.04, 0.07, 30)
    assert _sched(cfg, "freeze_last_layer")["epochs"] == 1
    assert (list(a.global_scale), list(a.local_scale), a.n_local, a.local_crop_size) == ([0.32, 1.0], [0.05, 0.32], 8, 96)
    assert (list(m.masking.ratio_range), m.masking.mask_probability) == ([0.1, 0.5], 0.5)
    assert (optim.blr, optim.lr_scaling, optim.lr_reference_batch, optim.min_lr, optim.warmup_epochs) == (
        0.004, "sqrt", 1024, 1e-6, 10)
    assert (optim.weight_decay, optim.weight_decay_end, optim.clip_grad, optim.clip_mode) == (0.04, 0.4, 3.0, "per_module")
    assert optim.betas == (0.9, 0.999)
    # train/vitl16_short.yaml on 4 nodes: 2048 images a step, LayerScale 1e-5, 125k steps
    cfg, optim = _paper("experiment=dinov2_vit_large_imagenet")
    assert cfg.backbone.name == "vit_large_patch16_224" and cfg.backbone.model_kwargs.init_values == 1e-5
    assert optim.peak_lr(cfg.trainer.batch_size) == pytest.approx(0.004 * math.sqrt(2))
    steps_per_epoch = 1_281_167 // cfg.trainer.batch_size
    assert steps_per_epoch * cfg.trainer.max_epochs == pytest.approx(100 * 1250, rel=0.01)
    assert steps_per_epoch * optim.warmup_epochs == pytest.approx(10 * 1250, rel=0.01)


def test_mae_paper_config_matches_official():
    cfg, optim = _paper("method=mae", "backbone=vit_base")
    m, a = cfg.method, cfg.method.augment
    # facebookresearch/mae PRETRAIN.md command over main_pretrain.py / models_mae.py
    assert (m.decoder_dim, m.decoder_depth, m.decoder_heads, m.mlp_ratio) == (512, 8, 16, 4.0)
    assert (m.norm_pix_loss, m.fixed_pos_embed, m.drop_path_rate, m.init, m.masking.ratio) == (
        True, True, 0.0, "mae", 0.75)
    assert (a.n_global, a.n_local, list(a.global_scale), a.flip_p, a.color_jitter_p) == (1, 0, [0.2, 1.0], 0.5, 0.0)
    assert (optim.blr, optim.lr_scaling, optim.lr_reference_batch, optim.min_lr, optim.warmup_epochs) == (
        1.5e-4, "linear", 256, 0.0, 40)
    assert (optim.weight_decay, optim.weight_decay_end, optim.betas, optim.clip_grad) == (0.05, 0.05, (0.9, 0.95), 0.0)
    assert optim.peak_lr(4096) == pytest.approx(2.4e-3)


def test_trainer_freezes_dinov2_last_layer_by_zero_lr(tmp_path, monkeypatch):
    """The engine passes last_layer_lr=0 while `freeze_last_layer` is on: the last layer does not move
    although its gradients exist, while the rest of the student trains."""
    from conftest import tiny_method_overrides
    from vfm import pretrain
    from vfm.engine import trainer as vtrainer

    cfg = compose_cfg(tiny_method_overrides("dinov2", {"teacher": "", "tokenizer": ""}) + [
        "trainer.max_steps=2", "trainer.precision=fp32", "evaluator=[]", "eval.baseline=false", "logger=none",
        "method.schedules.freeze_last_layer.epochs=2"], tmp_path)
    parts = pretrain.build_components(cfg, tmp_path)
    head = parts.method.student.dino_head
    last_before = head.last_layer_v.detach().clone()
    qkv_before = parts.method.student.backbone.model.blocks[0].attn.qkv.weight.detach().clone()
    seen: list[float | None] = []
    real = vtrainer.set_optimizer_values

    def record(opt, lr, wd, last_layer_lr=None):
        seen.append(last_layer_lr)
        real(opt, lr, wd, last_layer_lr=last_layer_lr)

    monkeypatch.setattr(vtrainer, "set_optimizer_values", record)
    pretrain.train(cfg, parts, tmp_path)
    assert seen == [0.0, 0.0]
    assert torch.equal(head.last_layer_v, last_before)
    assert not torch.equal(parts.method.student.backbone.model.blocks[0].attn.qkv.weight, qkv_before)
