"""Linear probe: the papers' options (feature recipe per method, DINOv2's grid, MAE's BatchNorm
without affine and LARS) and their config errors."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from vfm.backbones import Backbone
from vfm.evaluators.features import SplitFeatures
from vfm.evaluators.linear import (
    BN_EPS,
    LARS_TRUST,
    LinearProbe,
    _batch_norm,
    _column_masks,
    paper_features,
)

FAST = {"epochs": 8, "batch_size": 256}


@pytest.mark.parametrize(("paper", "width", "expected"), [
    ("dino", 384, "last4_cls"), ("dino", 192, "last4_cls"), ("dino", 768, "cls_avgpool"),
    ("ibot", 384, "last4_cls"), ("ibot", 1024, "cls_avgpool"),
    ("dinov2", 384, "grid"), ("mae", 768, "cls"), (None, 384, "global"),
])
def test_paper_features(paper: str | None, width: int, expected: str) -> None:
    """DINO eval_linear.py: n_last_blocks 4 for ViT-S, 1 + avgpool for ViT-B (iBOT run.sh the
    same); DINOv2 the grid; MAE --cls_token; without a paper, the encoder's own global feature."""
    assert paper_features(paper, width) == expected


def test_auto_resolves_against_the_encoder() -> None:
    vit = Backbone("vit_tiny_patch16_224", img_size=8, patch_size=4, in_chans=1,
                   model_kwargs=dict(depth=4, embed_dim=16, num_heads=2))
    assert LinearProbe(paper="dino").feature_recipe(vit) == "last4_cls"
    assert LinearProbe(paper="dinov2").feature_recipe(vit) == "last4_cls_avgpool"  # the grid's superset
    assert LinearProbe(paper="mae").feature_recipe(vit) == "cls"
    assert LinearProbe().feature_recipe(vit) == "global"  # e.g. BEiT's mean-pooled global feature stays
    assert LinearProbe(paper="dino", features="cls_avgpool").feature_recipe(vit) == "cls_avgpool"  # explicit wins
    assert LinearProbe(paper="mae").norm == "batchnorm" and LinearProbe(paper="dino").norm == "standardize"
    assert LinearProbe(paper="mae", norm="standardize").norm == "standardize"


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"features": "last3_cls"}, "features must be one of"), ({"paper": "simclr"}, "paper must be one of"),
    ({"norm": "layernorm"}, "norm must be one of"), ({"optimizer": "adam"}, "optimizer must be one of"),
    ({"warmup_epochs": 40}, "warmup_epochs"),
])
def test_bad_options(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        LinearProbe(**kwargs)


def blocks_features(n: int, signal_block: int, seed: int, width: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    """``last4_cls_avgpool``-shaped features (5 blocks of ``width``): only ``signal_block`` carries
    the label, with a large nuisance on every other block."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 3, (n,), generator=g)
    x = torch.randn(n, 5 * width, generator=g) * 3
    x[:, signal_block * width : (signal_block + 1) * width] = torch.randn(n, width, generator=g) * 0.3
    x[torch.arange(n), signal_block * width + y] += 2.0
    return x, y


@pytest.mark.parametrize(("signal_block", "n_blocks", "avgpool"), [(4, 1, 1.0), (0, 4, 0.0), (3, 1, 0.0)])
def test_grid_picks_the_recipe_that_sees_the_signal(signal_block: int, n_blocks: int, avgpool: float) -> None:
    """DINOv2's grid: heads on cls / last4_cls / cls_avgpool / last4_cls_avgpool; the one chosen on
    val must read the block that carries the label (block 4 = patch mean, 0 = the oldest [CLS],
    3 = the last [CLS]: the smallest recipe that reads it wins ties)."""
    f = SplitFeatures(*blocks_features(1500, signal_block, 0), *blocks_features(500, signal_block, 1),
                      *blocks_features(500, signal_block, 2), recipe="last4_cls_avgpool")
    m = LinearProbe(features="grid", lrs=(0.1, 1.0), **FAST)(f, num_classes=3)
    assert (m["linear/n_last_blocks"], m["linear/avgpool"]) == (n_blocks, avgpool)
    assert m["linear/top1"] > 90 and m["linear/val_top1"] > 90


def test_grid_head_reads_only_its_columns() -> None:
    """A grid head of recipe ``cls`` trained on the superset equals a probe trained on the last
    [CLS] block alone (the other columns are masked out of its forward and gradient)."""
    f = SplitFeatures(*blocks_features(600, 3, 0), *blocks_features(200, 3, 1), recipe="last4_cls_avgpool")
    masks = _column_masks("last4_cls_avgpool", ["cls", "last4_cls", "cls_avgpool", "last4_cls_avgpool"], 20, 1,
                          torch.device("cpu"))
    grid = LinearProbe(features="grid", lrs=(0.3,), **FAST)
    w, b, _ = grid._fit(f.train_x, f.train_y, 3, torch.Generator().manual_seed(0), masks)
    alone = LinearProbe(lrs=(0.3,), **FAST)
    w1, b1, _ = alone._fit(f.train_x[:, 12:16], f.train_y, 3, torch.Generator().manual_seed(0), None)
    assert torch.equal(w[0, :12], torch.zeros(12, 3)) and torch.equal(w[0, 16:], torch.zeros(4, 3))
    torch.testing.assert_close(w[0, 12:16], w1[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(b[0], b1[0], rtol=1e-5, atol=1e-6)
    assert masks[1, :16].all() and not masks[1, 16:].any()  # last4_cls: the four [CLS] blocks


def test_batch_norm_matches_torch_batchnorm_without_affine() -> None:
    """MAE's head: BatchNorm1d(D, affine=False, eps=1e-6): batch statistics in training, running
    ones (momentum 0.1, unbiased variance) at evaluation."""
    torch.manual_seed(0)
    bn = nn.BatchNorm1d(6, affine=False, eps=BN_EPS)
    running = (torch.zeros(6), torch.ones(6))
    for _ in range(5):
        x = torch.randn(32, 6) * 7 + 3
        torch.testing.assert_close(_batch_norm(x, *running), bn.train()(x))
    torch.testing.assert_close(running[0], bn.running_mean)
    torch.testing.assert_close(running[1], bn.running_var)
    x = torch.randn(10, 6)
    torch.testing.assert_close((x - running[0]) / (running[1] + BN_EPS).sqrt(), bn.eval()(x))


def test_lars_step_matches_mae_formula() -> None:
    """One head's LARS update against util/lars.py's rule written out: for the weight,
    g <- (g + wd w) * trust * |w| / |g + wd w| (1 when a norm is 0); the bias is neither decayed
    nor rescaled; then momentum mu = m mu + g, p -= lr mu."""
    torch.manual_seed(0)
    probe = LinearProbe(optimizer="lars", weight_decay=0.05, momentum=0.9)
    w, b = torch.randn(1, 4, 3), torch.randn(1, 3)
    buf_w, buf_b = torch.zeros_like(w), torch.zeros_like(b)
    ref_w, ref_b, mu_w, mu_b = w.clone(), b.clone(), torch.zeros(4, 3), torch.zeros(3)
    for _ in range(3):
        g_w, g_b = torch.randn(1, 4, 3), torch.randn(1, 3)
        probe._step(w, b, g_w, g_b, buf_w, buf_b, torch.tensor([0.5]))
        d = g_w[0] + 0.05 * ref_w[0]
        d = d * (LARS_TRUST * ref_w[0].norm() / d.norm())
        mu_w, mu_b = 0.9 * mu_w + d, 0.9 * mu_b + g_b[0]
        ref_w[0] -= 0.5 * mu_w
        ref_b[0] -= 0.5 * mu_b
    torch.testing.assert_close(w, ref_w)
    torch.testing.assert_close(b, ref_b)


def test_mae_protocol_end_to_end() -> None:
    """BatchNorm without affine + LARS with warmup learns separable clusters, features at any scale."""
    g = torch.Generator().manual_seed(0)

    def clusters(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        y = torch.randint(0, 4, (n,), generator=g)
        return (torch.nn.functional.one_hot(y, 8).float() * 3 + torch.randn(n, 8, generator=g)) * 1e3 + 50, y

    f = SplitFeatures(*clusters(1200), *clusters(300), *clusters(300))
    m = LinearProbe(paper="mae", optimizer="lars", warmup_epochs=2, lrs=(0.4, 4.0), **FAST)(f, num_classes=4)
    assert m["linear/top1"] > 95 and m["linear/val_top1"] > 95
