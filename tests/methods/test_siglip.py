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
