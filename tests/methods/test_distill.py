"""Distillation: the teacher's heads from a checkpoint, both objectives against their formulas, the
frozen teacher and the student EMA after a run, and the checks on the teacher file."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hydra.utils import instantiate
from safetensors.torch import load_file
from timm.layers import DropPath

from conftest import compose_cfg, tiny_method_overrides
from dino_teachers import tiny_dino_checkpoint
from vfm import evaluate, pretrain
from vfm.backbones import Backbone
from vfm.cli import run_or_exit
from vfm.config import ConfigError
from vfm.io import load_torch
from vfm.methods.distill import Distill
from vfm.methods.distill_teacher import load_teacher_heads
from vfm.pretrain import build_method

STUDENT = dict(img_size=28, patch_size=7, in_chans=1, model_kwargs=dict(depth=1, embed_dim=16, num_heads=2))
SCHED = {"teacher_temp": 0.04, "ema_momentum": 0.9, "freeze_last_layer": 0.0}


def _student() -> Backbone:
    return Backbone("vit_tiny_patch16_224", **STUDENT)


def _crops(b: int = 3) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return [torch.randn(b, 1, 28, 28, generator=g) for _ in range(2)] + [torch.randn(b, 1, 14, 14, generator=g)]


@pytest.mark.parametrize("kind,patch", [("dino", None), ("ibot", "shared"), ("dinov2", "separate")])
def test_teacher_heads_come_from_the_checkpoint(tmp_path, kind, patch):
    path = tiny_dino_checkpoint(tmp_path / f"{kind}.pt", kind)
    model = load_torch(path)["model"]
    heads = load_teacher_heads(path, embed_dim=24)
    cls_name = "dino_head" if kind == "dinov2" else "head"
    assert torch.equal(heads.dino.last_layer_v, model[f"teacher.{cls_name}.last_layer_v"]) and heads.out_dim == 64
    if patch is None:
        assert heads.patch is None
    elif patch == "shared":
        assert heads.patch is heads.dino and heads.separate_patch is None
    else:
        assert torch.equal(heads.patch.last_layer_v, model["teacher.ibot_head.last_layer_v"]) and heads.patch_out_dim == 48
    torch.manual_seed(0)
    method = Distill(_student(), teacher=str(path))
    assert not any(p.requires_grad for p in method.teacher.parameters())
    assert method.distill_patches == (patch is not None)
    assert (method.student.ibot_head is not None) == (patch == "separate")
    assert method.student.dino_head.last_layer_v.shape == (64, 16)  # the teacher's prototypes, fresh


def test_dino_head_objective_is_the_dino_plus_ibot_formula(tmp_path):
    torch.manual_seed(0)
    method = Distill(_student(), teacher=str(tiny_dino_checkpoint(tmp_path / "t.pt")), student_temp=0.1)
    crops = _crops()
    out = method.training_step({"crops": crops}, 0, SCHED)
    with torch.no_grad():  # the center starts at zero: plain softmax(t / tau_t) targets
        t = method.teacher.backbone.forward_tokens(torch.cat(crops[:2]))
        p_cls = F.softmax(method.teacher.dino_head(t["global"]) / 0.04, -1).chunk(2)
        p_patch = F.softmax(method.teacher.ibot_head(t["patch"].flatten(0, 1)) / 0.04, -1)
        s = method.student.backbone.forward_tokens(torch.cat(crops[:2]))
        logp = [F.log_softmax(x / 0.1, -1) for x in method.student.dino_head(s["global"]).chunk(2)]
        logp.append(F.log_softmax(method.student.dino_head(method.student.backbone(crops[2])) / 0.1, -1))
        pairs = [(-(p_cls[i] * logp[j]).sum(-1).mean()) for i in range(2) for j in range(3) if i != j]
        dino = sum(pairs) / len(pairs)
        ibot = -(p_patch * F.log_softmax(method.student.ibot_head(s["patch"].flatten(0, 1)) / 0.1, -1)).sum(-1).mean()
    assert out["loss_dino"].item() == pytest.approx(dino.item(), rel=1e-5)
    assert out["loss_ibot"].item() == pytest.approx(ibot.item(), rel=1e-5)  # every patch of the global crops
    assert out["loss"].item() == pytest.approx((dino + ibot).item(), rel=1e-5)
    assert method.dino_loss.center.abs().sum() > 0 and method.ibot_loss.center.abs().sum() > 0  # updated after


def test_cosine_objective_regresses_cls_and_patch_features(mim_artifacts):
    torch.manual_seed(0)
    method = Distill(_student(), teacher=str(mim_artifacts["teacher"]), objective="cosine")  # an exported encoder
    assert method.projection.weight.shape == (24, 16)  # student width -> teacher width
    crops = _crops()
    out = method.training_step({"crops": crops}, 0, SCHED)
    with torch.no_grad():
        x = torch.cat(crops[:2])
        t, s = method.teacher.backbone.forward_tokens(x), method.student.backbone.forward_tokens(x)
        cos_cls = F.cosine_similarity(method.projection(s["global"]), t["global"], dim=-1).mean()
        cos_patch = F.cosine_similarity(method.projection(s["patch"]), t["patch"], dim=-1).mean()
    assert out["loss"].item() == pytest.approx((2 - cos_cls - cos_patch).item(), rel=1e-5)


def test_teacher_file_checks(mim_artifacts):
    with pytest.raises(ValueError, match="no DINO head.*objective=cosine"):
        Distill(_student(), teacher=str(mim_artifacts["teacher"]))
    with pytest.raises(ValueError, match="patch grids must match"):
        Distill(Backbone("vit_tiny_patch16_224", **{**STUDENT, "patch_size": 4}), teacher=str(mim_artifacts["teacher"]),
                objective="cosine")
    with pytest.raises(ValueError, match="method.objective"):
        Distill(_student(), teacher=str(mim_artifacts["teacher"]), objective="mse")


def _sinkhorn_knopp(logits: torch.Tensor, temp: float, iterations: int) -> torch.Tensor:
    """DINOv2's `sinkhorn_knopp_teacher` on one process, written out: Q = exp(l / tau)^T [K, B],
    total mass 1, then rows (prototypes) to 1/K and columns (samples) to 1/B in turn, times B."""
    q = torch.exp(logits.double() / temp).t()
    k, b = q.shape
    q = q / q.sum()
    for _ in range(iterations):
        q = q / q.sum(dim=1, keepdim=True) / k
        q = q / q.sum(dim=0, keepdim=True) / b
    return (q * b).t()


def test_sinkhorn_knopp_targets(tmp_path):
    torch.manual_seed(0)
    method = Distill(_student(), teacher=str(tiny_dino_checkpoint(tmp_path / "t.pt")), centering="sinkhorn_knopp",
                     sinkhorn_iterations=3)
    logits = torch.randn(6, 64, generator=torch.Generator().manual_seed(2)) * 0.1
    probs = method._teacher_probs(logits, method.dino_loss, 0.04)
    assert torch.allclose(probs.double(), _sinkhorn_knopp(logits, 0.04, 3), rtol=1e-5, atol=1e-9)
    assert torch.allclose(probs.sum(-1), torch.ones(6), atol=1e-6)  # each sample: a distribution
    # many iterations: every prototype gets the same share B / K of the batch
    method.sinkhorn_iterations = 200
    assert torch.allclose(method._teacher_probs(logits, method.dino_loss, 0.04).sum(0), torch.full((64,), 6 / 64), atol=1e-5)
    # the training step's DINO loss uses these targets, and no center
    method.sinkhorn_iterations = 3
    crops = _crops()
    out = method.training_step({"crops": crops}, 0, SCHED)
    with torch.no_grad():
        t = method.teacher.backbone.forward_tokens(torch.cat(crops[:2]))
        p_cls = _sinkhorn_knopp(method.teacher.dino_head(t["global"]), 0.04, 3).float().chunk(2)
        s = method.student.backbone.forward_tokens(torch.cat(crops[:2]))
        logp = [F.log_softmax(x / 0.1, -1) for x in method.student.dino_head(s["global"]).chunk(2)]
        logp.append(F.log_softmax(method.student.dino_head(method.student.backbone(crops[2])) / 0.1, -1))
        pairs = [(-(p_cls[i] * logp[j]).sum(-1).mean()) for i in range(2) for j in range(3) if i != j]
    assert out["loss_dino"].item() == pytest.approx((sum(pairs) / len(pairs)).item(), rel=1e-5)
    assert method.dino_loss.center.abs().sum() == 0  # no center with Sinkhorn-Knopp


def test_run_keeps_the_teacher_and_exports_the_student_ema(mim_artifacts, tmp_path):
    cfg = compose_cfg(tiny_method_overrides("distill", mim_artifacts)
                      + ["trainer.max_epochs=1", "eval.baseline=false", "evaluator=[knn]", "logger=none",
                         "trainer.precision=fp32"], tmp_path / "run")
    method = build_method(cfg)
    assert pretrain.encoder_prefix(method) == "student_ema."
    metrics = pretrain.run(cfg)
    assert metrics["train/steps"] == 8
    # the run's kNN is the exported encoder's: `evaluate` on encoder.safetensors reports the same
    common = ["dataset=synthetic", "trainer.progress=false", "trainer.device=cpu", "logger=none",
              "trainer.precision=fp32", "evaluator=[knn]", "backbone.patch_size=7",
              "+backbone.model_kwargs={depth: 2, embed_dim: 32, num_heads: 2}"]
    out = evaluate.run(compose_cfg(common + [f"checkpoint={tmp_path / 'run/encoder.safetensors'}"], tmp_path / "e",
                                   "evaluate"))
    assert out["knn/top1"] == metrics["knn/top1"] and (metrics["knn/top1"] * 128 / 100).is_integer()
    state = torch.load(tmp_path / "run/checkpoints/last.pt", weights_only=False)
    teacher = load_torch(mim_artifacts["dino_teacher"])["model"]
    for key in ("teacher.backbone.model.blocks.0.attn.qkv.weight", "teacher.dino_head.last_layer_v"):
        assert torch.equal(state["model"][key], teacher[key]), key  # frozen: never updated
    exported = load_file(str(tmp_path / "run/encoder.safetensors"))
    ema = state["model"]["student_ema.model.pos_embed"]
    assert torch.equal(next(v for k, v in exported.items() if k.endswith("pos_embed")), ema)
    assert not torch.equal(ema, state["model"]["student.backbone.model.pos_embed"])  # an average, not the student


def test_student_has_no_stochastic_depth_even_on_a_backbone_with_it(mim_artifacts, tmp_path):
    overrides = tiny_method_overrides("distill", mim_artifacts) + ["backbone=vit_small"]
    cfg = compose_cfg(overrides, tmp_path / "run")
    assert cfg.backbone.drop_path_rate == 0.1  # ViT-S's own rate, which the paper's distillation removes
    rates = [m.drop_prob for m in build_method(cfg).student.backbone.modules() if isinstance(m, DropPath)]
    assert rates and all(r == 0.0 for r in rates)
    kept = build_method(compose_cfg(overrides + ["method.drop_path_rate=null"], tmp_path / "run"))
    assert max(m.drop_prob for m in kept.student.backbone.modules() if isinstance(m, DropPath)) == pytest.approx(0.1)


def test_dino_head_without_local_crops_is_a_config_error_before_training(mim_artifacts, tmp_path, capsys):
    cfg = compose_cfg(tiny_method_overrides("distill", mim_artifacts) + ["method.augment.n_local=0"], tmp_path / "run")
    message = (r"^method\.augment\.n_local=0: method\.objective=dino_head needs local crops \(the student's views in "
               r"the DINO loss\); set method\.augment\.n_local to 1 or more \(the paper: 8\) or method\.objective=cosine$")
    with pytest.raises(ConfigError, match=message):
        pretrain.run(cfg)
    assert not (tmp_path / "run" / "checkpoints").exists()  # refused before training
    with pytest.raises(SystemExit) as info:
        run_or_exit(pretrain.run, cfg)
    err = capsys.readouterr().err
    assert info.value.code == 2 and err.count("\n") == 1 and err.startswith("config error: method.augment.n_local=0: ")
    cosine = Distill(_student(), teacher=str(mim_artifacts["teacher"]), objective="cosine")
    assert cosine.build_collate(instantiate(cfg.method.augment)) is not None  # cosine reads the global crops only


def test_missing_teacher_is_a_config_error(mim_artifacts, tmp_path):
    overrides = [o for o in tiny_method_overrides("distill", mim_artifacts) if not o.startswith("method.teacher=")]
    with pytest.raises(ConfigError, match="method.teacher"):
        pretrain.run(compose_cfg(overrides + ["method.teacher=/nonexistent/run"], tmp_path / "run"))
