"""SigLIP: CLIP's towers with the sigmoid loss, its two scalars, and a run with zero-shot evaluation."""

from __future__ import annotations

import math

import pytest
import torch

from conftest import compose_cfg, tiny_method_overrides
from vfm import evaluate, pretrain
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
    with torch.no_grad():  # t = 3, b = -1: away from the init, so that t and b each matter
        siglip.logit_scale.fill_(math.log(3.0))
        siglip.logit_bias.fill_(-1.0)
    out = siglip.training_step(batch, 0, {})
    with torch.no_grad():
        x, y = siglip.encode_image(images).double(), siglip.encode_text(texts).double()
    assert torch.allclose(x.norm(dim=-1), torch.ones(4, dtype=torch.float64), atol=1e-6)
    assert torch.allclose(y.norm(dim=-1), torch.ones(4, dtype=torch.float64), atol=1e-6)
    # -1/B sum_i sum_j log sigmoid(z_ij (t x_i.y_j + b)), z = +1 on the diagonal, -1 off it
    expected = -sum(math.log(1 / (1 + math.exp(-(1 if i == j else -1) * (3.0 * float(x[i] @ y[j]) - 1.0))))
                    for i in range(4) for j in range(4)) / 4
    assert out["loss"].item() == pytest.approx(expected, rel=1e-5)
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
                      + ["trainer.max_epochs=1", "eval.baseline=false", "evaluator=[knn,zero_shot]", "logger=none",
                         "trainer.precision=fp32"], tmp_path / "run")
    metrics = pretrain.run(cfg)
    assert metrics["train/steps"] == 8
    assert metrics["zero_shot/top5"] == 100.0  # 4 classes: every label is among the top 5
    assert (metrics["zero_shot/top1"] * 128 / 100).is_integer()  # hits out of the 128 test images
    # `evaluate` on the run's checkpoint (its text tower included) reports the same numbers
    common = ["dataset=synthetic_captions", "trainer.progress=false", "trainer.device=cpu", "logger=none",
              "trainer.precision=fp32", "evaluator=[knn,zero_shot]", "backbone.patch_size=7",
              "+backbone.model_kwargs={depth: 2, embed_dim: 32, num_heads: 2}"]
    out = evaluate.run(compose_cfg(common + [f"checkpoint={cfg.paths.output_dir}"], tmp_path / "e", "evaluate"))
    assert out["zero_shot/top1"] == metrics["zero_shot/top1"] and out["knn/top1"] == metrics["knn/top1"]
