"""Last-layer attention maps: probabilities as timm computes them, registers, threshold."""

from __future__ import annotations

import pytest
import timm
import torch

from vfm.backbones import Backbone
from vfm.viz import (
    as_vision_transformer,
    attention_threshold_mask,
    cls_attention,
    last_block_attention,
    last_layer_attention,
)


def _vit(**kw) -> torch.nn.Module:
    torch.manual_seed(0)
    return timm.create_model(
        "vit_tiny_patch16_224", img_size=28, patch_size=7, in_chans=1, depth=2, embed_dim=32, num_heads=2,
        num_classes=0, dynamic_img_size=True, **kw,
    ).eval()


@pytest.fixture(params=[0, 2], ids=["cls", "cls+2reg"])
def vit(request):
    return _vit(reg_tokens=request.param) if request.param else _vit()


def test_shapes_rows_sum_to_one_and_registers_excluded(vit):
    x = torch.randn(3, 1, 28, 28)
    prefix = vit.num_prefix_tokens
    rows = cls_attention(vit, x)
    maps = last_layer_attention(vit, x)
    assert rows.shape == (3, 2, prefix + 16) and maps.shape == (3, 2, 4, 4)
    assert torch.allclose(rows.sum(-1), torch.ones(3, 2), atol=1e-6)  # softmax over every key
    assert torch.equal(maps.flatten(-2), rows[..., prefix:])  # only the patch keys, row-major
    # the mass the [CLS] query puts on [CLS] and the registers is missing from the map, not renormalised
    assert torch.allclose(maps.sum((-2, -1)) + rows[..., :prefix].sum(-1), torch.ones(3, 2), atol=1e-6)
    assert (rows[..., :prefix].sum(-1) > 0).all()


@pytest.mark.parametrize("fused", [True, False])
def test_attention_times_v_is_timm_attention_output(vit, fused):
    """(attn @ v) must equal what the model's own last Attention feeds its output projection."""
    for m in vit.modules():
        if hasattr(m, "fused_attn"):
            m.fused_attn = fused  # timm's SDPA path and its manual path must both agree with us
    seen = []
    handle = vit.blocks[-1].attn.proj.register_forward_pre_hook(lambda _m, args: seen.append(args[0]))
    x = torch.randn(2, 1, 28, 28)
    with torch.no_grad():
        attn, v = last_block_attention(vit, x)
        vit(x)
    handle.remove()
    b, heads, n, dh = v.shape
    ours = (attn @ v).transpose(1, 2).reshape(b, n, heads * dh)
    assert attn.shape == (2, 2, n, n) and n == vit.num_prefix_tokens + 16
    assert torch.allclose(ours, seen[-1], atol=1e-5, rtol=0)
    assert len(vit.blocks[-1].attn._forward_pre_hooks) == 0  # our capture hook is gone


def test_backbone_wrapper_and_dynamic_size():
    bb = Backbone("vit_tiny_patch16_224", img_size=28, patch_size=7, in_chans=1,
                  model_kwargs={"depth": 2, "embed_dim": 32, "num_heads": 2}).eval()
    x = torch.randn(2, 1, 28, 28)
    assert torch.equal(last_layer_attention(bb, x), last_layer_attention(bb.model, x))
    assert last_layer_attention(bb, torch.randn(1, 1, 42, 35)).shape == (1, 2, 6, 5)  # 6x5 grid


def test_resnet_is_rejected_with_a_clear_message():
    with pytest.raises(ValueError, match="need a ViT with patch tokens"):
        as_vision_transformer(timm.create_model("resnet18", num_classes=0, in_chans=1))
    with pytest.raises(ValueError, match="need a ViT"):
        last_layer_attention(Backbone("resnet18", in_chans=1), torch.randn(1, 1, 28, 28))


def test_threshold_by_hand():
    maps = torch.tensor([0.1, 0.4, 0.2, 0.3]).reshape(1, 1, 2, 2) * 0.5  # mass renormalised over patches
    keep = attention_threshold_mask(maps, 0.6).flatten().tolist()
    assert keep == [False, True, False, True]  # 0.4 + 0.3 >= 0.6, 0.4 alone is not
    assert attention_threshold_mask(maps, 0.35).flatten().tolist() == [False, True, False, False]
    assert attention_threshold_mask(maps, 1.0).all()
    with pytest.raises(ValueError):
        attention_threshold_mask(maps, 0.0)


@pytest.mark.parametrize("threshold", [0.1, 0.5, 0.6, 0.9])
def test_threshold_keeps_the_mass_and_is_minimal(threshold):
    g = torch.Generator().manual_seed(0)
    maps = torch.rand(4, 3, 5, 6, generator=g) ** 3  # skewed, like real attention
    keep = attention_threshold_mask(maps, threshold)
    assert keep.shape == maps.shape and keep.dtype == torch.bool
    probs = (maps / maps.sum((-2, -1), keepdim=True)).flatten(-2)
    kept = keep.flatten(-2)
    mass = (probs * kept).sum(-1)
    assert (mass >= threshold - 1e-6).all()
    # minimal: no smaller set reaches the threshold, i.e. the top-(k-1) patches fall short
    k = kept.sum(-1)
    top = probs.sort(-1, descending=True).values.cumsum(-1)
    short = top.gather(-1, (k - 2).clamp_min(0).unsqueeze(-1)).squeeze(-1)
    assert ((k == 1) | (short < threshold)).all()
    # the kept patches are the strongest ones
    weakest_kept = torch.where(kept, probs, torch.inf).amin(-1)
    strongest_dropped = torch.where(kept, -torch.inf, probs).amax(-1)
    assert (weakest_kept >= strongest_dropped).all()
    # and the same set as DINO's visualize_attention.py (ascending sort, cumulative mass > 1 - t)
    val, idx = probs.sort(-1)
    official = torch.zeros_like(kept).scatter(-1, idx, val.cumsum(-1) > 1 - threshold)
    assert torch.equal(official, kept)
