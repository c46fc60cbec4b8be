"""iBOT and BEiT against their official code: masking, the BEiT student, initialisation, and the
composed paper configs against tables of the official values (bytedance/ibot, microsoft/unilm beit/)."""

from __future__ import annotations

import math

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from conftest import compose_cfg
from vfm.backbones import Backbone
from vfm.data.masking import BlockMaskGenerator, sample_masks
from vfm.methods.beit import BEiT
from vfm.methods.ibot import iBOT

BEIT_KW = dict(use_abs_pos_emb=False, use_rel_pos_bias=False, use_shared_rel_pos_bias=True, init_values=0.1,
               use_fc_norm=False, depth=3, embed_dim=32, num_heads=2)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _tiny_beit(**kw) -> Backbone:
    return Backbone("beit_base_patch16_224", img_size=28, patch_size=7, in_chans=1,
                    model_kwargs={**BEIT_KW, **kw.pop("model_kwargs", {})}, **kw)


# ------------------------------------------------------------------ iBOT masking (loader.py)


def test_ibot_masks_about_half_the_crops_independently_at_ratios_0_1_to_0_5():
    # --pred_ratio 0 0.3 --pred_ratio_var 0 0.2: ratio 0 or U(0.1, 0.5), chosen per crop
    masks = sample_masks(400, 14, ratio_range=(0.1, 0.5), mask_probability=0.5, stratified=False,
                         min_num_patches=None, generator=_gen(0))
    counts = masks.sum(dim=1)
    masked = counts[counts > 0]
    assert abs(masked.numel() / 400 - 0.5) < 0.1  # 4 sigma of a Binomial(400, 0.5) share
    assert int(196 * 0.1) <= int(masked.min()) and int(masked.max()) <= int(196 * 0.5)
    assert masked.float().mean().item() == pytest.approx(196 * 0.3, rel=0.1)
    # independent draws: the number of masked crops varies from batch to batch (stratified: always 4)
    per_batch = {int(sample_masks(8, 14, mask_probability=0.5, stratified=False, generator=_gen(s)).any(1).sum())
                 for s in range(10)}
    assert len(per_batch) > 1


def test_ibot_minimum_block_is_a_third_of_the_short_side_squared():
    # loader.py: low = (min(H, W) // 3) ** 2
    for grid, low in ((14, 16), (4, 1), ((7, 20), 4), (2, 1), ((12, 15), 16)):
        assert BlockMaskGenerator(grid, min_num_patches=None).min_num_patches == low
    # One round on an empty 14 x 14 grid with 19 patches wanted (ratio 0.1): the area is U(16, 19)
    # before rounding, so a painted block holds 12-19 patches (minimum 4 would also give 2 x 2 ones).
    gen, painted = BlockMaskGenerator(14, min_num_patches=None), []
    for seed in range(40):
        painted.append(gen._add_block(torch.zeros(14, 14, dtype=torch.bool), 19, _gen(seed)))
    assert all(n == 0 or 12 <= n <= 19 for n in painted) and sum(n > 0 for n in painted) > 30


def test_official_loop_stops_short_and_exact_mode_does_not():
    gen_official = BlockMaskGenerator(14, min_num_patches=16, exact=False)
    gen_exact = BlockMaskGenerator(14, min_num_patches=16)
    official = [int(gen_official(75, _gen(s)).sum()) for s in range(60)]
    assert all(c <= 75 for c in official) and min(official) < 75  # some masks end short, as in BEiT
    assert all(int(gen_exact(75, _gen(s)).sum()) == 75 for s in range(60))


# ------------------------------------------------------------------ BEiT / EVA-01 mask counts


@pytest.mark.parametrize(("method", "grid", "count"), [("beit", 14, 75), ("eva", 16, 105)])
def test_paper_mask_count_at_the_paper_resolution(method, grid, count):
    # unilm beit --num_mask_patches 75 (196 patches); EVA-01 --num_mask_patches 105 (256 patches)
    extra = ["method.tokenizer=."] if method == "beit" else ["method.teacher=."]
    masking = instantiate(compose_cfg([f"method={method}", "~recipe", *extra]).method.masking)
    masks = masking(batch_size=6, grid_size=grid, generator=_gen(0))
    assert masks.shape == (6, grid * grid) and (masks.sum(1) == count).all()
    small = masking(batch_size=2, grid_size=4, generator=_gen(0))  # the 28 px / 7 px recipes still work
    assert (small.sum(1) == 6).all()


# ------------------------------------------------------------------ the BEiT student (timm Beit)


def test_beit_backbone_shared_rel_pos_bias_no_abs_pos_layerscale():
    bb = _tiny_beit()
    m = bb.model
    assert bb.family == "beit" and bb.num_prefix_tokens == 1 and bb.patch_size == 7
    assert m.pos_embed is None and m.rel_pos_bias is not None
    assert all(blk.attn.relative_position_bias_table is None for blk in m.blocks)
    assert all(torch.all(blk.gamma_1 == 0.1) and torch.all(blk.gamma_2 == 0.1) for blk in m.blocks)


def test_beit_unmasked_tokens_equal_timm_and_masked_ones_replace_the_patch_embedding():
    torch.manual_seed(0)
    bb = _tiny_beit().eval().requires_grad_(False)
    bb.enable_mask_token(std=0.02)
    x = torch.randn(2, 1, 28, 28)
    out = bb.forward_tokens(x)
    ref = bb.model.forward_features(x)  # timm's own forward, final norm on every token
    assert torch.allclose(out["patch"], ref[:, 1:], atol=1e-6) and torch.allclose(out["prefix"], ref[:, :1], atol=1e-6)
    assert torch.allclose(out["global"], bb(x), atol=1e-6)
    mask = torch.zeros(2, 16, dtype=torch.bool)
    mask[0, [0, 5, 6]] = True
    mask[1, 10:] = True
    # timm's forward with the patch embedding's output edited by hand: the mask token before the blocks
    hook = bb.model.patch_embed.register_forward_hook(
        lambda _module, _inp, tokens: torch.where(mask.unsqueeze(-1), bb.mask_token.expand_as(tokens), tokens))
    try:
        ref_masked = bb.model.forward_features(x)
    finally:
        hook.remove()
    masked = bb.forward_tokens(x, mask=mask)
    assert torch.allclose(masked["patch"], ref_masked[:, 1:], atol=1e-6)
    assert not torch.allclose(masked["patch"], out["patch"], atol=1e-3)


@torch.no_grad()
def test_beit_init_truncates_at_one_std_and_rescales_by_sqrt_2l():
    torch.manual_seed(0)
    bb = _tiny_beit(weight_init="beit", model_kwargs={"embed_dim": 64})
    for layer_id, blk in enumerate(bb.model.blocks, start=1):
        bound = 0.02 / math.sqrt(2 * layer_id)  # trunc_normal_(a=-std, b=std), then fix_init_weight
        for w in (blk.attn.proj.weight, blk.mlp.fc2.weight):
            assert float(w.abs().max()) <= bound * (1 + 1e-6)
            assert float(w.abs().max()) > 0.95 * bound
        assert float(blk.attn.qkv.weight.abs().max()) <= 0.02 * (1 + 1e-6)
    assert float(bb.model.patch_embed.proj.weight.abs().max()) <= 0.02 * (1 + 1e-6)
    assert float(bb.model.cls_token.abs().max()) <= 0.02 * (1 + 1e-6)
    # timm's own Beit init also applies fix_init_weight (std 0.02 untruncated, then / sqrt(2 l))
    timm_init = _tiny_beit(model_kwargs={"embed_dim": 64})
    stds = [float(b.mlp.fc2.weight.std()) for b in timm_init.model.blocks]
    assert stds[0] / stds[2] == pytest.approx(math.sqrt(3), rel=0.1)


def test_mask_token_init_per_method(mim_artifacts):
    vit = Backbone("vit_tiny_patch16_224", img_size=28, patch_size=7, in_chans=1,
                   model_kwargs=dict(depth=1, embed_dim=24, num_heads=2))
    ibot = iBOT(vit, out_dim=16, hidden_dim=16, bottleneck_dim=8)
    assert torch.equal(ibot.student.backbone.mask_token, torch.zeros(1, 1, 24))  # ibot masked_embed: zeros
    torch.manual_seed(0)
    student = _tiny_beit(model_kwargs={"embed_dim": 24})
    beit = BEiT(student, tokenizer=str(mim_artifacts["tokenizer"]))
    token = beit.backbone.mask_token.detach()
    assert 0 < float(token.abs().max()) <= 0.02 and float(token.std()) > 0.005  # trunc_normal_(std=.02, +-std)
    assert float(beit.head.weight.detach().abs().max()) <= 0.02 * (1 + 1e-6)


def test_beit_weight_decay_groups_follow_unilm(mim_artifacts):
    beit = BEiT(_tiny_beit(model_kwargs={"embed_dim": 24}), tokenizer=str(mim_artifacts["tokenizer"]))
    names = {id(p): n for n, p in beit.named_parameters()}
    groups = {g["name"]: {names[id(p)] for p in g["params"]} for g in beit.param_groups()}
    assert "backbone.model.cls_token" in groups["no_decay"]
    assert "backbone.mask_token" in groups["decay"] and "head.weight" in groups["decay"]
    assert "backbone.model.rel_pos_bias.relative_position_bias_table" in groups["decay"]
    assert "backbone.model.blocks.0.gamma_1" in groups["no_decay"] and "head.bias" in groups["no_decay"]


# ------------------------------------------------------------------ paper configs vs official values

IBOT_OFFICIAL = {  # bytedance/ibot README ViT-S/16 command + main_ibot.py defaults
    "backbone.name": "vit_small_patch16_224", "backbone.patch_size": 16, "backbone.drop_path_rate": 0.1,
    "method.out_dim": 8192, "method.shared_head": True, "method.norm_last_layer": False,
    "method.hidden_dim": 2048, "method.bottleneck_dim": 256, "method.head_layers": 3,
    "method.use_bn_in_head": False, "method.student_temp": 0.1, "method.center_momentum": 0.9,
    "method.lambda_cls": 1.0, "method.lambda_patch": 1.0,
    "method.augment.n_global": 2, "method.augment.n_local": 10, "method.augment.local_crop_size": 96,
    "method.augment.global_scale": [0.25, 1.0], "method.augment.local_scale": [0.05, 0.25],
    "method.augment.blur_p": [1.0, 0.1, 0.5], "method.augment.solarize_p": [0.0, 0.2, 0.0],
    "method.augment.color_jitter_p": 0.8, "method.augment.grayscale_p": 0.2,
    "method.masking.ratio_range": [0.1, 0.5], "method.masking.mask_probability": 0.5,
    "method.masking.stratified": False, "method.masking.min_num_patches": None,
    "method.schedules.teacher_temp.start": 0.04, "method.schedules.teacher_temp.value": 0.07,
    "method.schedules.teacher_temp.warmup_epochs": 30,
    "method.schedules.teacher_patch_temp.start": 0.04, "method.schedules.teacher_patch_temp.value": 0.07,
    "method.schedules.teacher_patch_temp.warmup_epochs": 30,
    "method.schedules.teacher_momentum.base": 0.996, "method.schedules.teacher_momentum.final": 1.0,
    "method.schedules.freeze_last_layer.epochs": 1,
    "optim.name": "adamw", "optim.blr": 0.0005, "optim.lr": None, "optim.lr_scaling": "linear",
    "optim.lr_reference_batch": 256, "optim.min_lr": 1e-6, "optim.warmup_epochs": 10,
    "optim.weight_decay": 0.04, "optim.weight_decay_end": 0.4, "optim.betas": [0.9, 0.999],
    "optim.clip_grad": 3.0, "optim.clip_mode": "per_param",
}

BEIT_OFFICIAL = {  # microsoft/unilm beit/README ImageNet-1k command + run_beit_pretraining.py defaults
    "backbone.name": "beit_base_patch16_224", "backbone.patch_size": 16, "backbone.drop_path_rate": 0.1,
    "backbone.weight_init": "beit", "backbone.model_kwargs.use_abs_pos_emb": False,
    "backbone.model_kwargs.use_rel_pos_bias": False, "backbone.model_kwargs.use_shared_rel_pos_bias": True,
    "backbone.model_kwargs.init_values": 0.1, "dataset.img_size": 224,
    "method.augment.global_scale": [0.08, 1.0], "method.augment.flip_p": 0.5,
    "method.augment.color_jitter_p": 1.0, "method.augment.brightness": 0.4, "method.augment.contrast": 0.4,
    "method.augment.saturation": 0.4, "method.augment.hue": 0.0,
    "method.masking.ratio_range": [0.383, 0.383], "method.masking.mask_probability": 1.0,
    "method.masking.min_num_patches": 16,
    "optim.name": "adamw", "optim.lr": 1.5e-3, "optim.min_lr": 1e-5, "optim.warmup_epochs": 10,
    "optim.weight_decay": 0.05, "optim.weight_decay_end": 0.05, "optim.betas": [0.9, 0.999],
    "optim.eps": 1e-8, "optim.clip_grad": 3.0, "optim.clip_mode": "global",
    "trainer.max_epochs": 800, "trainer.batch_size": 2048,
}


@pytest.mark.parametrize(("overrides", "official"), [
    (["method=ibot", "backbone=vit_small", "dataset=imagefolder", "dataset.root=."], IBOT_OFFICIAL),
    (["experiment=beit_base_imagenet", "method.tokenizer=.", "dataset.root=."], BEIT_OFFICIAL),
], ids=["ibot", "beit"])
def test_paper_config_carries_the_official_values(overrides, official):
    cfg = compose_cfg(overrides)
    ours = {key: OmegaConf.to_object(v) if OmegaConf.is_config(v := OmegaConf.select(cfg, key)) else v
            for key in official}
    assert ours == official
    assert int(196 * cfg.method.masking.ratio_range[0]) == (75 if "beit" in cfg.method._target_ else 19)


@torch.no_grad()
def test_attention_maps_of_the_beit_student_are_its_own_probabilities():
    # viz recomputes the last block's softmax: with Beit's q/v biases and its shared relative bias
    from vfm.viz.attention import last_block_attention

    torch.manual_seed(0)
    bb = _tiny_beit().eval()
    with torch.no_grad():
        bb.model.rel_pos_bias.relative_position_bias_table.normal_()  # a bias that matters
    attn_mod, outputs = bb.model.blocks[-1].attn, []
    hook = attn_mod.register_forward_hook(lambda _m, _i, out: outputs.append(out))
    x = torch.randn(2, 1, 28, 28)
    try:
        probs, v = last_block_attention(bb, x)
    finally:
        hook.remove()
    b, heads, n, _ = probs.shape
    mixed = (probs @ v).transpose(1, 2).reshape(b, n, -1)
    assert torch.allclose(attn_mod.proj(mixed), outputs[0], atol=1e-5)
    assert torch.allclose(probs.sum(-1), torch.ones(b, heads, n), atol=1e-5)
