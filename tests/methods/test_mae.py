"""MAE: visible-only encoding, un-shuffling, fixed sin-cos positions, loss on masked patches."""

import math

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from vfm.backbones import Backbone, sincos_pos_embed_2d
from vfm.data.masking import random_masks
from vfm.methods.mae import MAE


def _backbone(**kw) -> Backbone:
    torch.manual_seed(0)
    return Backbone("vit_tiny_patch16_224", img_size=28, patch_size=7, in_chans=1,
                    model_kwargs=dict(depth=2, embed_dim=32, num_heads=2), **kw)


def _mae(**kw) -> MAE:
    return MAE(_backbone(), decoder_dim=16, decoder_depth=1, decoder_heads=2, **kw)


def test_unshuffle_restores_patch_order():
    mask = random_masks(5, 4, ratio=0.75, generator=torch.Generator().manual_seed(0))
    ids_keep, ids_restore = MAE.random_masking(mask)
    tokens = torch.arange(16).expand(5, 16)
    visible = torch.gather(tokens, 1, ids_keep)
    assert (~mask).sum(1).eq(ids_keep.shape[1]).all()
    assert torch.equal(torch.gather(mask, 1, ids_keep), torch.zeros_like(ids_keep, dtype=torch.bool))
    # the decoder's order: visible tokens, then one placeholder per masked patch; un-shuffled by ids_restore
    shuffled = torch.cat([visible, torch.full((5, 16 - ids_keep.shape[1]), -1)], dim=1)
    restored = torch.gather(shuffled, 1, ids_restore)
    assert torch.equal(restored, torch.where(mask, -1, tokens))


def test_random_masking_rejects_unequal_counts():
    with pytest.raises(ValueError, match="same number of visible patches"):
        MAE.random_masking(torch.tensor([[True, False], [True, True]]))


def test_visible_only_encoder_matches_full_encoder_when_nothing_is_masked():
    bb = _backbone().eval()
    x = torch.randn(2, 1, 28, 28)
    full = bb.forward_tokens(x)
    ids_all = torch.arange(16).expand(2, 16)
    vis = bb.forward_visible(x, ids_all)
    assert torch.allclose(vis["tokens"][:, 1:], full["patch"], atol=1e-5)
    assert torch.allclose(vis["global"], full["global"], atol=1e-5)
    # with a subset, the tokens depend only on the kept patches (nothing leaks from masked ones)
    ids = torch.tensor([[0, 5, 10, 15]] * 2)
    x2 = x.clone()
    x2[:, :, 7:14, 0:7] = 100.0  # patch 4 changes; it is not kept
    assert torch.allclose(bb.forward_visible(x, ids)["tokens"], bb.forward_visible(x2, ids)["tokens"], atol=1e-5)


def test_encoder_flops_fall_with_the_mask_ratio():
    bb = _backbone().eval()
    x = torch.randn(4, 1, 28, 28)
    flops = []
    for ratio in (0.0, 0.5, 0.75):
        mask = random_masks(4, 4, ratio=ratio, generator=torch.Generator().manual_seed(0))
        ids_keep, _ = MAE.random_masking(mask)
        with FlopCounterMode(display=False) as counter:
            bb.forward_visible(x, ids_keep)
        flops.append(counter.get_total_flops())
    assert flops[0] > flops[1] > flops[2]
    assert flops[2] < 0.45 * flops[0]  # 4 + 1 tokens instead of 16 + 1 (attention is quadratic)


def test_sincos_table_formula_and_frozen_position_embedding():
    d, gh, gw = 8, 2, 3
    table = sincos_pos_embed_2d(d, gh, gw)
    for k in range(gh * gw):
        row, col = divmod(k, gw)
        for half, pos in ((0, col), (1, row)):  # first half: column, second half: row (MAE's layout)
            for i in range(d // 4):
                w = 1.0 / 10000 ** (i / (d // 4))
                assert table[k, half * d // 2 + i].item() == pytest.approx(math.sin(pos * w), abs=1e-6)
                assert table[k, half * d // 2 + d // 4 + i].item() == pytest.approx(math.cos(pos * w), abs=1e-6)
    mae = _mae()
    pe = mae.backbone.model.pos_embed
    assert not pe.requires_grad
    assert torch.equal(pe[0, 0], torch.zeros(32))  # the [CLS] slot
    assert torch.allclose(pe[0, 1:], sincos_pos_embed_2d(32, 4, 4))


def test_mae_loss_ignores_visible_patches_and_trains():
    mae = _mae(norm_pix_loss=False)
    x = torch.randn(4, 1, 28, 28)
    mask = random_masks(4, 4, ratio=0.75, generator=torch.Generator().manual_seed(0))
    out = mae.training_step({"crops": [x], "masks": [mask]}, 0, {})
    x2 = x.clone()
    # change pixels of a *visible* patch of image 0 only in the target: the loss must not move.
    # (predict with x, score against x2)
    vis = int((~mask[0]).nonzero()[0])
    r, c = divmod(vis, 4)
    x2[0, :, r * 7:(r + 1) * 7, c * 7:(c + 1) * 7] += 5.0
    pred = mae.predict(x, mask)
    assert mae.forward_loss(x, pred, mask).item() == pytest.approx(mae.forward_loss(x2, pred, mask).item(), rel=1e-6)
    out["loss"].backward()
    assert mae.backbone.model.blocks[0].attn.qkv.weight.grad.abs().sum() > 0
    assert mae.decoder.mask_token.grad.abs().sum() > 0
    assert mae.encoder is mae.backbone


def test_reconstruct_shape():
    mae = _mae()
    x = torch.randn(3, 1, 28, 28)
    mask = random_masks(3, 4, ratio=0.75, generator=torch.Generator().manual_seed(0))
    assert mae.reconstruct(x, mask).shape == x.shape
