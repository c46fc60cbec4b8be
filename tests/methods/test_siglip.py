"""SigLIP: CLIP's towers with the sigmoid loss, its two scalars, and a run with zero-shot evaluation."""

from __future__ import annotations

import math

import pytest
import torch

from conftest import compose_cfg, tiny_method_overrides
from vfm import pretrain
from vfm.losses.siglip_loss import SigLIPLoss
from vfm.methods.siglip import SigLIP
from vfm.pretrain import build_method


@pytest.fixture
def siglip(mim_artifacts, tmp_path) -> SigLIP:
    torch.manual_seed(0)
    return build_method(compose_cfg(tiny_method_overrides("siglip", mim_artifacts), tmp_path))


def test_paper_initialisation_and_no_weight_decay_on_the_scalars(siglip):
    assert isinstance(siglip, SigLIP)
    assert siglip.logit_scale.exp().item() == pytest.approx(10.0) and siglip.logit_bias.item() == -10.0
    no_decay = {id(p) for g in siglip.param_groups() if g["wd_mult"] == 0 for p in g["params"]}
    assert {id(siglip.logit_scale), id(siglip.logit_bias)} <= no_decay


def test_weight_decay_only_on_the_kernels_of_linear_and_conv_layers(siglip, mim_artifacts, tmp_path):
    decay = {n for g in siglip.param_groups() if g["wd_mult"] == 1.0 for n, p in siglip.named_parameters()
             if any(p is q for q in g["params"])}
    assert "backbone.model.patch_embed.proj.weight" in decay and "image_projection.weight" in decay
    assert "text_tower.blocks.0.attn.qkv.weight" in decay and "text_tower.text_projection.weight" in decay
    for exempt in ("backbone.model.pos_embed", "backbone.model.cls_token", "text_tower.positional_embedding",
                   "text_tower.token_embedding.weight", "backbone.model.blocks.0.norm1.weight",
                   "backbone.model.blocks.0.attn.qkv.bias", "logit_scale", "logit_bias"):
        assert exempt not in decay, exempt
    # 1 patch embedding, 4 per image block, 4 per text block, the two projections
    n_blocks, n_text = len(siglip.backbone.model.blocks), len(siglip.text_tower.blocks)
    assert len(decay) == 1 + 4 * n_blocks + 4 * n_text + 2
    clip_style = build_method(compose_cfg(tiny_method_overrides("siglip", mim_artifacts)
                                          + ["method.decay_kernels_only=false"], tmp_path))
    decayed = {id(p) for g in clip_style.param_groups() if g["wd_mult"] == 1.0 for p in g["params"]}
    assert id(clip_style.backbone.model.pos_embed) in decayed
    assert id(clip_style.text_tower.token_embedding.weight) in decayed


@pytest.mark.parametrize("dataset", ["synthetic_captions", "fashion_mnist_captions"])
def test_torch_weight_decay_times_the_lr_is_big_visions_decoupled_1e_4(dataset):
    """torch's AdamW decays by lr * wd per step, big_vision by wd alone (both times the schedule):
    the paper optimizer and the Fashion-MNIST recipe keep lr * weight_decay at big_vision's 1e-4."""
    optim = compose_cfg(["method=siglip", f"dataset={dataset}"]).optim
    assert optim.lr * optim.weight_decay == pytest.approx(1e-4, rel=1e-12)
    assert optim.weight_decay_end == optim.weight_decay


def test_training_step_is_the_sigmoid_loss_of_the_embeddings(siglip):
    images = torch.randn(4, 1, 28, 28)
    texts = ["a photo of a shirt.", "a photo of a bag.", "a photo of a boot.", "a photo of a coat."]
    batch = {"crops": [images], "text": siglip.text_tower.tokenize(texts)}
    siglip.eval()
    out = siglip.training_step(batch, 0, {})
    expected = SigLIPLoss()(siglip.encode_image(images), siglip.encode_text(texts), siglip.logit_scale, siglip.logit_bias)
    assert out["loss"].item() == pytest.approx(expected.item(), rel=1e-6)
    out["loss"].backward()
    assert siglip.logit_bias.grad is not None and siglip.logit_scale.grad is not None


def test_temperature_is_clamped_only_on_request(siglip, mim_artifacts, tmp_path):
    with torch.no_grad():
        siglip.logit_scale.fill_(math.log(500.0))
    siglip.on_step_end(0, {})
    assert siglip.logit_scale.exp().item() == pytest.approx(500.0)  # the paper: no clamp
    clamped = build_method(compose_cfg(tiny_method_overrides("siglip", mim_artifacts) + ["method.max_logit_scale=100"],
                                       tmp_path))
    with torch.no_grad():
        clamped.logit_scale.fill_(math.log(500.0))
    clamped.on_step_end(0, {})
    assert clamped.logit_scale.exp().item() == pytest.approx(100.0, rel=1e-5)


def test_siglip_trains_and_evaluates_zero_shot(mim_artifacts, tmp_path):
    cfg = compose_cfg(tiny_method_overrides("siglip", mim_artifacts)
                      + ["trainer.max_epochs=1", "eval.baseline=false", "evaluator=[knn,zero_shot]", "logger=none"],
                      tmp_path / "run")
    metrics = pretrain.run(cfg)
    assert metrics["train/steps"] == 8 and 0 <= metrics["zero_shot/top1"] <= 100
