"""EVA-01, EVA-02 and BEiT v2's VQ-KD against their official code (baaivision/EVA, microsoft/unilm
beit2/): the masked-only loss, the NormEMA codebook, the teacher's CLIP normalisation and
projection, the VQ-KD decoder, the EVA-02 backbone, and the composed paper configs."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import timm
import torch
import torch.nn.functional as F
from torch import nn

from conftest import compose_cfg
from vfm.backbones import Backbone
from vfm.backbones.teacher import CLIP_MEAN, CLIP_STD, Teacher
from vfm.engine.optim import OptimSpec
from vfm.heads.vector_quantizer import VectorQuantizer
from vfm.heads.vqkd_decoder import VQKDDecoder
from vfm.losses.mim_losses import negative_cosine

# --- loss on masked tokens only (EVA-01 and EVA-02: labels = clip_features[bool_masked_pos]) ---

def test_masked_only_loss_equals_the_loss_on_masked_positions_and_ignores_visible_ones():
    g = torch.Generator().manual_seed(0)
    pred, target = torch.randn(2, 6, 5, generator=g), torch.randn(2, 6, 5, generator=g)
    mask = torch.tensor([[1, 0, 1, 0, 0, 1], [0, 0, 0, 1, 1, 0]], dtype=torch.bool)
    official = -F.cosine_similarity(pred[mask], target[mask], dim=-1).mean()  # compute_loss(outputs, labels)
    assert torch.allclose(negative_cosine(pred, target, mask), 1.0 + official, atol=1e-6)
    pred2, target2 = pred.clone(), target.clone()
    pred2[~mask], target2[~mask] = 100.0, -3.0
    assert torch.equal(negative_cosine(pred2, target2, mask), negative_cosine(pred, target, mask))


def test_eva02_paper_config_regresses_masked_tokens_only():
    for method in ("eva", "eva02"):
        cfg = compose_cfg([f"method={method}", "method.teacher=x", "~recipe"])
        assert cfg.method.loss_on == "masked", method


# --- NormEMA (beit2/norm_ema_quantizer.py, norm_ema_inplace) ---

def _two_code_quantizer(update: str) -> VectorQuantizer:
    q = VectorQuantizer(num_codes=2, code_dim=2, decay=0.5, update=update, kmeans_init=False,
                        restart_dead_codes=False).train()
    q.codebook.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0]]))
    q.embed_sum.copy_(q.codebook)
    q.cluster_size.fill_(1.0)
    q.initted.fill_(True)
    return q


def _unit(deg: float) -> list[float]:
    return [math.cos(math.radians(deg)), math.sin(math.radians(deg))]


def test_norm_ema_update_by_hand_on_two_codes():
    z = torch.tensor([_unit(30), _unit(10), _unit(120)])  # two vectors to code 0, one to code 1
    q = _two_code_quantizer("norm_ema")
    _, codes, _, _ = q(z)
    assert codes.tolist() == [0, 0, 1]
    # code <- l2norm(d * code + (1 - d) * l2norm(mean of its vectors)), d = 0.5
    mean0 = torch.tensor(_unit(20))  # l2norm((u30 + u10) / 2) = u20
    e0 = F.normalize(0.5 * torch.tensor([1.0, 0.0]) + 0.5 * mean0, dim=0)  # = u10: the bisector of 0 and 20 deg
    e1 = F.normalize(0.5 * torch.tensor([0.0, 1.0]) + 0.5 * torch.tensor(_unit(120)), dim=0)  # = u105
    assert torch.allclose(e0, torch.tensor(_unit(10)), atol=1e-6) and torch.allclose(e1, torch.tensor(_unit(105)), atol=1e-6)
    assert torch.allclose(q.codebook, torch.stack([e0, e1]), atol=1e-6)
    # the count-weighted EMA gives a different code 0 (its count of 2 outweighs the pseudo-count 1)
    qe = _two_code_quantizer("ema")
    qe(z)
    sum0 = 0.5 * torch.tensor([1.0, 0.0]) + 0.5 * (torch.tensor(_unit(30)) + torch.tensor(_unit(10)))
    assert torch.allclose(qe.codebook[0], F.normalize(sum0 / 1.5, dim=0), atol=1e-6)
    assert not torch.allclose(qe.codebook[0], e0, atol=1e-3)


def test_norm_ema_leaves_unused_codes_and_needs_unit_codes():
    q = _two_code_quantizer("norm_ema")
    q(torch.tensor([_unit(5), _unit(-5)]))
    assert torch.equal(q.codebook[1], torch.tensor([0.0, 1.0]))
    with pytest.raises(ValueError, match="l2_norm"):
        VectorQuantizer(num_codes=2, code_dim=2, update="norm_ema", l2_norm=False)


# --- the teacher: CLIP's normalisation and projection ---

def _rgb_teacher_file(tmp_path: Path) -> Path:
    torch.manual_seed(0)
    bb = Backbone("vit_tiny_patch16_224", img_size=16, patch_size=8, in_chans=3,
                  model_kwargs=dict(depth=1, embed_dim=16, num_heads=2))
    return bb.export(tmp_path / "rgb_teacher.safetensors")


def test_teacher_renormalisation_to_clip_statistics_is_exact(tmp_path):
    mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
    teacher = Teacher(_rgb_teacher_file(tmp_path), normalize="clip", data_mean=mean, data_std=std)
    raw = torch.rand(2, 3, 16, 16, dtype=torch.float64).float()
    images = (raw - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    clip_input = (raw - torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)) / torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    assert torch.allclose(teacher.prepare(images), clip_input, atol=1e-6)
    expected = teacher.encoder.forward_tokens(clip_input)["patch"]
    assert torch.allclose(teacher(images), expected, atol=1e-5)
    as_given = Teacher(_rgb_teacher_file(tmp_path), normalize="dataset")
    assert torch.equal(as_given.prepare(images), images)


def test_clip_normalisation_of_grayscale_data_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="teacher_normalize=dataset"):
        Teacher(_rgb_teacher_file(tmp_path), normalize="clip", data_mean=[0.5], data_std=[0.25])


def test_a_clip_teachers_projection_is_kept_and_applied_to_every_patch_token(tmp_path):
    kw = dict(img_size=32, depth=1, embed_dim=32, num_heads=2)
    torch.manual_seed(0)
    clip_tower = timm.create_model("vit_base_patch16_clip_224", num_classes=8, **kw).eval()  # head = CLIP's proj
    path = tmp_path / "open_clip_like.pth"
    torch.save(clip_tower.state_dict(), path)
    teacher = Teacher(path, model_name="vit_base_patch16_clip_224", normalize="dataset", model_kwargs=kw)
    assert teacher.out_dim == 8 and teacher.projection is not None
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        tokens = clip_tower.forward_features(x)[:, clip_tower.num_prefix_tokens:]  # ln_post applied
        expected = clip_tower.head(tokens)  # ... @ proj
    assert torch.allclose(teacher(x), expected, atol=1e-5)


# --- the VQ-KD decoder (modeling_vqkd.py: ViT with learned positions, Linear-Tanh-Linear) ---

def test_vqkd_decoder_has_learned_positions_and_a_tanh_task_layer():
    torch.manual_seed(0)
    dec = VQKDDecoder(8, 12, dim=16, depth=2, num_heads=2, grid=(4, 4))
    assert dec.pos_embed.shape == (1, 17, 16) and dec.pos_embed.requires_grad and dec.cls_token.requires_grad
    assert [type(m) for m in dec.task_layer] == [nn.Linear, nn.Tanh, nn.Linear]
    assert dec(torch.randn(3, 16, 8), (4, 4)).shape == (3, 16, 12)
    assert dec(torch.randn(3, 4, 8), (2, 2)).shape == (3, 4, 12)  # another grid: interpolated positions
    # fix_init_weight: block l's output projections are scaled by 1 / sqrt(2 l)
    ref = VQKDDecoder(8, 12, dim=16, depth=2, num_heads=2, grid=(4, 4))
    assert ref.blocks[1].mlp.fc2.weight.std() < ref.blocks[0].mlp.fc2.weight.std()


# --- composed paper configs against the official values ---

EVA01 = {"lr": 1.0e-3, "eps": 1.0e-6, "betas": [0.9, 0.98], "weight_decay": 0.05, "weight_decay_end": 0.05,
         "warmup_epochs": 2, "min_lr": 1.0e-5, "clip_grad": 3.0, "clip_mode": "global"}
EVA02 = {**EVA01, "lr": 1.5e-3, "warmup_epochs": 1}
VQKD = {"blr": 5.0e-5, "lr_reference_batch": 128, "eps": 1.0e-8, "betas": [0.9, 0.99], "weight_decay": 1.0e-4,
        "weight_decay_end": 1.0e-4, "warmup_epochs": 10, "min_lr": 1.0e-5, "clip_grad": 0.0}


@pytest.mark.parametrize("method,official", [("eva", EVA01), ("eva02", EVA02)])
def test_eva_paper_optimizer(method, official):
    cfg = compose_cfg([f"method={method}", "method.teacher=x", "~recipe"])
    assert {k: cfg.optim[k] for k in official} == official
    spec = OptimSpec(lr=cfg.optim.lr, blr=cfg.optim.blr)
    assert spec.peak_lr(4096) == spec.peak_lr(256) == official["lr"]  # used as given, no batch scaling
    assert cfg.method.teacher_normalize == "clip" and list(cfg.method.augment.global_scale) == [0.2, 1.0]


def test_vqkd_paper_config():
    cfg = compose_cfg(["method=vqkd", "method.teacher=x", "~recipe"])
    assert {k: cfg.optim[k] for k in VQKD} == VQKD
    spec = OptimSpec(blr=cfg.optim.blr, lr_reference_batch=cfg.optim.lr_reference_batch)
    assert spec.peak_lr(512) == pytest.approx(2.0e-4)  # 5e-5 * 512 / 128
    m = cfg.method
    assert (m.num_codes, m.code_dim, m.decay, m.beta) == (8192, 32, 0.99, 1.0)
    assert (m.codebook_update, m.kmeans_init, m.restart_dead_codes) == ("norm_ema", True, False)
    assert (m.decoder, m.decoder_dim, m.decoder_depth, m.decoder_heads) == ("beit2", 768, 3, 12)
    assert m.teacher_normalize == "clip" and list(m.augment.global_scale) == [0.08, 1.0]


def test_the_pixel_tokenizer_keeps_its_own_codebook_and_decoder():
    m = compose_cfg(["method=vq_tokenizer", "~recipe"]).method
    assert (m.codebook_update, m.decoder, m.restart_dead_codes) == ("ema", "mae", True)


# --- the EVA-02 student: timm's Eva behind the Backbone's token API ---

def _eva02(**kw) -> Backbone:
    torch.manual_seed(0)
    return Backbone("eva02_tiny_patch14_224", img_size=28, patch_size=7, in_chans=1,
                    model_kwargs=dict(depth=2, global_pool="token"), **kw).eval()


def test_eva02_backbone_tokens_match_timms_forward_and_take_a_mask_token():
    bb = _eva02(mask_token=True)
    assert bb.is_vit and bb.patch_size == 7 and bb.num_prefix_tokens == 1
    assert type(bb.model.blocks[0].mlp).__name__ in ("SwiGLU", "GluMlp") and bb.model.rope is not None  # SwiGLU, RoPE
    x = torch.randn(2, 1, 28, 28)
    out = bb.forward_tokens(x)
    with torch.no_grad():
        full = bb.model.forward_features(x)  # timm's own forward: [CLS] + 16 patches after the final norm
    assert torch.allclose(out["patch"], full[:, 1:], atol=1e-5) and torch.allclose(out["global"], bb(x), atol=1e-5)
    none = torch.zeros(2, 16, dtype=torch.bool)
    assert torch.allclose(bb.forward_tokens(x, mask=none)["patch"], out["patch"], atol=1e-6)
    # masking: the mask token replaces the patch embedding before the position embeddings (as the official
    # forward_features), so a masked image equals the same forward on patch embeddings set to the token
    mask = torch.zeros(2, 16, dtype=torch.bool)
    mask[:, :5] = True
    m = bb.model
    with torch.no_grad():
        t = m.patch_embed(x)
        t[mask] = bb.mask_token[0, 0]
        t, rope = m._pos_embed(t)
        for block in m.blocks:
            t = block(t, rope=rope)
        expected = m.norm(t)[:, 1:]
    assert torch.allclose(bb.forward_tokens(x, mask=mask)["patch"], expected, atol=1e-5)


def test_eva02_student_trains_with_eva(mim_artifacts):
    from vfm.data.masking import sample_masks
    from vfm.methods.eva import EVA

    student = _eva02().train()
    m = EVA(student, teacher=str(mim_artifacts["teacher"]), teacher_normalize="dataset")
    x = torch.randn(3, 1, 28, 28)
    mask = sample_masks(3, 4, ratio_range=(0.4, 0.4), mask_probability=1.0, generator=torch.Generator().manual_seed(0),
                        min_num_patches=1)
    out = m.training_step({"crops": [x], "masks": [mask]}, 0, {})
    out["loss"].backward()
    assert student.model.blocks[0].attn.proj.weight.grad.abs().sum() > 0 and student.mask_token.grad is not None


def test_eva02_base_backbone_config_is_timms_eva02_b():
    cfg = compose_cfg(["method=eva02", "method.teacher=x", "backbone=eva02_base", "~recipe"])
    b = cfg.backbone
    assert (b.name, b.patch_size, b.drop_path_rate, b.model_kwargs.global_pool) == ("eva02_base_patch14_224", 14, 0.0, "token")


def test_vqkd_and_eva_leave_tokens_and_positions_without_weight_decay(mim_artifacts):
    """Both official `create_optimizer`s skip the model's no_weight_decay(): [CLS] and positions."""
    from vfm.methods.eva import EVA
    from vfm.methods.vq_tokenizer import VQTokenizer

    bb = lambda: Backbone("vit_tiny_patch16_224", img_size=28, patch_size=7, in_chans=1,  # noqa: E731
                          model_kwargs=dict(depth=1, embed_dim=16, num_heads=2))
    vqkd = VQTokenizer(bb(), teacher=str(mim_artifacts["teacher"]), teacher_normalize="dataset", num_codes=16,
                       code_dim=8, decoder_dim=16, decoder_depth=1, decoder_heads=2)
    eva = EVA(bb(), teacher=str(mim_artifacts["teacher"]), teacher_normalize="dataset")
    for method in (vqkd, eva):
        names = {id(p): n for n, p in method.named_parameters()}
        decayed = {names[id(p)] for g in method.param_groups() if g["wd_mult"] > 0 for p in g["params"]}
        assert not {n for n in decayed if n.endswith(("pos_embed", "cls_token"))}, decayed
