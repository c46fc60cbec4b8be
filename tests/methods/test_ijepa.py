"""I-JEPA: loss and target normalisation against their formulas, the predictor, the EMA target
encoder, the schedules and the paper config."""

from __future__ import annotations

import math

import pytest
import torch

from conftest import compose_cfg
from vfm.backbones import Backbone
from vfm.data.multiblock import MultiBlockMaskGenerator
from vfm.engine.optim import OptimSpec
from vfm.engine.schedules import Linear
from vfm.heads.predictor import JEPAPredictor
from vfm.losses.ijepa_loss import IJEPALoss, normalize_targets
from vfm.methods.ijepa import IJEPA, gather_patches


def _backbone(**kwargs) -> Backbone:
    torch.manual_seed(0)
    model_kwargs = dict(depth=1, embed_dim=32, num_heads=2, class_token=False, global_pool="avg", fc_norm=False)
    return Backbone("vit_tiny_patch16_224", img_size=28, patch_size=4, in_chans=1, model_kwargs={**model_kwargs, **kwargs})


def _method(**kwargs) -> IJEPA:
    return IJEPA(_backbone(**kwargs), predictor_dim=16, predictor_depth=1)


def _batch(b: int = 3) -> dict:
    masks = MultiBlockMaskGenerator(min_keep=3, target_scale=(0.1, 0.15))(
        batch_size=b, grid_size=7, generator=torch.Generator().manual_seed(0))
    torch.manual_seed(1)
    return {"crops": [torch.randn(b, 1, 28, 28)], "label": torch.zeros(b, dtype=torch.int64),
            "context_ids": masks.context, "target_ids": masks.targets}


def test_smooth_l1_and_l2_by_hand():
    pred = torch.zeros(1, 1, 2)
    target = torch.tensor([[[0.5, 2.0]]])
    # smooth L1 (beta 1): 0.5 * 0.5^2 = 0.125 below beta, 2 - 0.5 = 1.5 above; mean 0.8125
    assert IJEPALoss()(pred, target).item() == pytest.approx(0.8125)
    assert IJEPALoss("l2")(pred, target).item() == pytest.approx((0.25 + 4.0) / 2)
    with pytest.raises(ValueError, match="loss must be one of"):
        IJEPALoss("l1")


def test_targets_are_layer_normalised_without_affine():
    h = torch.tensor([[1.0, 2.0, 3.0, 4.0]])
    # mean 2.5, biased variance 1.25, eps 1e-5
    expected = (h - 2.5) / math.sqrt(1.25 + 1e-5)
    assert torch.allclose(normalize_targets(h), expected, atol=1e-6)
    out = normalize_targets(torch.randn(2, 5, 8) * 7 + 3)
    assert torch.allclose(out.mean(-1), torch.zeros(2, 5), atol=1e-5)


def test_gather_patches_by_hand():
    tokens = torch.arange(2 * 4).float().view(2, 4, 1)  # image b, patch n -> 4 b + n
    ids = torch.tensor([[[0, 3], [1, 2]], [[2, 3], [0, 1]]])  # [block, image, K]
    assert gather_patches(tokens, ids).squeeze(-1).tolist() == [[0, 3], [5, 6], [2, 3], [4, 5]]


def test_predictor_shape_and_one_sequence_per_target_block():
    torch.manual_seed(0)
    pred = JEPAPredictor(32, (7, 7), predictor_dim=16, depth=2, num_heads=2).eval()
    ctx_ids = torch.tensor([[[0, 1, 2], [3, 4, 5]]])  # 1 context block, B = 2, K = 3
    tgt_ids = torch.tensor([[[10, 11], [12, 13]], [[20, 21], [30, 31]], [[40, 41], [42, 43]]])  # 3 targets
    context = torch.randn(2, 3, 32)
    out = pred(context, ctx_ids, tgt_ids)
    assert out.shape == (3 * 2, 2, 32)
    # target block i of image b is row i * B + b, predicted without seeing the other blocks
    alone = pred(context, ctx_ids, tgt_ids[1:2])
    assert torch.allclose(out[2:4], alone, atol=1e-5)
    # two context blocks: rows (i * n_ctx + j) * B + b
    two = pred(torch.cat([context, context]), torch.cat([ctx_ids, ctx_ids]), tgt_ids)
    assert two.shape == (3 * 2 * 2, 2, 32) and torch.allclose(two[4:6], out[2:4], atol=1e-5)


def test_training_step_trains_context_encoder_and_predictor_only():
    method = _method()
    out = method.training_step(_batch(), 0, {})
    out["loss"].backward()
    assert out["loss"].ndim == 0 and torch.isfinite(out["loss"])
    assert out["target_patches"].item() == _batch()["target_ids"].shape[-1]
    assert all(p.grad is None for p in method.target_encoder.parameters())
    assert method.backbone.model.blocks[0].attn.qkv.weight.grad is not None
    assert method.predictor.mask_token.grad is not None
    assert method.encoder is method.target_encoder


def test_target_is_the_normalised_target_encoder_output_at_the_target_patches():
    method = _method()
    batch = _batch()
    images, tgt = batch["crops"][0], batch["target_ids"]
    full = method.target_encoder.forward_tokens(images)["patch"]
    h = method.forward_target(images, tgt, 1)
    i, b, k = 2, 1, 0
    expected = normalize_targets(full[b, tgt[i, b, k]])
    assert torch.allclose(h[i * images.shape[0] + b, k], expected, atol=1e-5)


def test_ema_update_of_the_target_encoder():
    method = _method()
    with torch.no_grad():
        for p in method.backbone.parameters():
            p.add_(1.0)
    before = [p.clone() for p in method.target_encoder.parameters()]
    student = [p.clone() for p in method.backbone.parameters()]
    method.on_step_end(0, {"target_momentum": 0.9})
    for t, t0, s in zip(method.target_encoder.parameters(), before, student):
        assert torch.allclose(t, 0.9 * t0 + 0.1 * s, atol=1e-6)


def test_encoder_feature_is_the_mean_of_the_patch_tokens_and_survives_export(tmp_path):
    method = _method(global_pool="token", class_token=True)  # a backbone as timm builds it by default
    x = torch.randn(2, 1, 28, 28)
    enc = method.encoder.eval()
    assert torch.allclose(enc(x), enc.forward_tokens(x)["patch"].mean(1), atol=1e-5)
    from vfm.backbones.timm_backbone import load_exported

    plain = load_exported(enc.export(tmp_path / "enc.safetensors")).eval()
    assert torch.allclose(plain(x), enc(x), atol=1e-5)


def test_linear_momentum_schedule_by_hand():
    values = Linear(0.996, 1.0).build(2, 5)  # 10 steps
    assert values[0].item() == 0.996
    assert values[9].item() == pytest.approx(0.996 + 9 * 0.004 / 10)


def test_lr_warmup_starts_at_warmup_lr():
    lr = OptimSpec(lr=1e-3, warmup_lr=2e-4, warmup_epochs=1, min_lr=1e-6).lr_schedule(256).build(10, 3)
    assert lr[0].item() == pytest.approx(2e-4) and lr[9].item() == pytest.approx(1e-3)  # 10 warmup steps
    assert lr[10].item() == pytest.approx(1e-3)
    # 20 cosine steps from 1e-3 towards min_lr: the last is step 19 of 20, one step short of 1e-6
    assert lr[-1].item() == pytest.approx(1e-6 + 0.5 * (1e-3 - 1e-6) * (1 + math.cos(math.pi * 19 / 20)), rel=1e-12)


def test_paper_config_carries_the_official_values(tmp_path):
    cfg = compose_cfg(["method=ijepa", "~recipe"], tmp_path)
    m, o, b = cfg.method, cfg.optim, cfg.backbone
    assert (m.predictor_dim, m.predictor_depth, m.loss) == (384, 12, "smooth_l1")
    assert (m.masking.n_targets, list(m.masking.target_scale), list(m.masking.target_aspect)) == (4, [0.15, 0.2], [0.75, 1.5])
    assert (m.masking.n_contexts, list(m.masking.context_scale), m.masking.min_keep) == (1, [0.85, 1.0], 10)
    assert not m.masking.allow_overlap and not m.masking.full_grid_positions
    assert (m.schedules.target_momentum.base, m.schedules.target_momentum.final) == (0.996, 1.0)
    assert list(m.augment.global_scale) == [0.3, 1.0] and m.augment.flip_p == 0.0 and m.augment.color_jitter_p == 0.0
    assert (o.lr, o.warmup_lr, o.warmup_epochs, o.min_lr) == (1e-3, 2e-4, 40, 1e-6)
    assert (o.weight_decay, o.weight_decay_end, list(o.betas), o.clip_grad) == (0.04, 0.4, [0.9, 0.999], 0.0)
    assert not b.model_kwargs.class_token and b.model_kwargs.global_pool == "avg" and b.drop_path_rate == 0.0
