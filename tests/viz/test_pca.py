"""Patch-feature PCA as RGB: range, shape, deterministic signs, recovery of known directions."""

from __future__ import annotations

import pytest
import torch

from vfm.viz import patch_pca_rgb, principal_components


def _orthonormal(d: int, k: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(d, k, generator=g))
    return q.T  # [k, d], orthonormal rows


def test_rgb_range_shape_and_determinism():
    g = torch.Generator().manual_seed(0)
    tokens = torch.randn(4, 12, 24, generator=g)
    rgb = patch_pca_rgb(tokens, (3, 4))
    assert rgb.shape == (4, 3, 3, 4) and rgb.dtype == torch.float32
    assert rgb.min() >= 0 and rgb.max() <= 1
    for c in range(3):  # min-max per component, jointly over all images
        assert rgb[:, c].min() == 0 and rgb[:, c].max() == pytest.approx(1.0)
    assert torch.equal(rgb, patch_pca_rgb(tokens.clone(), (3, 4)))
    grey = patch_pca_rgb(tokens, (3, 4), n_components=1)
    assert torch.equal(grey[:, 0], grey[:, 1]) and torch.equal(grey[:, 0], grey[:, 2])
    with pytest.raises(ValueError, match="grid"):
        patch_pca_rgb(tokens, (4, 4))


def test_sign_convention():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(50, 10, generator=g) * torch.linspace(3, 0.5, 10)
    _, comps, _ = principal_components(x, 3)
    pivot = comps.abs().argmax(1)
    assert (comps[torch.arange(3), pivot] > 0).all()  # largest-magnitude loading positive
    # flipping the features flips no component, so the colours are just inverted (x -> 1 - x)
    _, comps_neg, _ = principal_components(-x, 3)
    assert torch.allclose(comps, comps_neg, atol=1e-5)
    rgb, rgb_neg = patch_pca_rgb(x.reshape(2, 25, 10), (5, 5)), patch_pca_rgb(-x.reshape(2, 25, 10), (5, 5))
    assert torch.allclose(rgb, 1 - rgb_neg, atol=1e-5)


def test_recovers_three_known_orthogonal_directions():
    d = 32
    u = _orthonormal(d, 3)
    g = torch.Generator().manual_seed(2)
    # coefficients with exactly zero sample correlation, so the true directions are the exact PCs
    raw = torch.randn(300, 3, generator=g)
    q, _ = torch.linalg.qr(raw - raw.mean(0))
    coeff = q * 300**0.5 * torch.tensor([5.0, 3.0, 1.5])
    feats = coeff @ u + 0.01 * torch.randn(300, d, generator=g) + 4.0  # an offset: PCA must centre
    proj, comps, mean = principal_components(feats, 3)
    overlap = (comps @ u.T).abs()  # |cos| between found and true directions
    assert torch.allclose(overlap.max(1).values, torch.ones(3), atol=1e-3)
    assert sorted(overlap.argmax(1).tolist()) == [0, 1, 2]  # each true direction found once (any order)
    assert torch.allclose(mean, feats.mean(0))
    assert torch.allclose(proj, (feats - mean) @ comps.T, atol=1e-4)
    # and rendered: each channel is, up to sign and affine scaling, one of the true coefficients
    rgb = patch_pca_rgb(feats.reshape(3, 100, d), (10, 10)).permute(0, 2, 3, 1).reshape(300, 3)
    corr = torch.corrcoef(torch.cat([rgb, coeff], 1).T)[:3, 3:].abs()
    assert (corr.max(1).values > 0.999).all()


def test_foreground_removal_blacks_out_the_background():
    d, b, h, w = 16, 2, 6, 6
    u = _orthonormal(d, 4, seed=3)
    g = torch.Generator().manual_seed(4)
    fg = torch.zeros(h, w, dtype=torch.bool)
    fg[1:5, 2:5] = True  # an object in the middle; the border is background
    fg = fg.flatten().repeat(b)
    feats = 0.05 * torch.randn(b * h * w, d, generator=g) + 6.0 * u[0]  # background: one cluster
    parts = torch.randn(int(fg.sum()), 3, generator=g) @ u[1:]  # the object varies along 3 directions
    feats[fg] = -6.0 * u[0] + parts
    for sign in (1.0, -1.0):  # either orientation of the first component: the border decides
        rgb = patch_pca_rgb(sign * feats.reshape(b, h * w, d), (h, w), foreground_threshold=0.5)
        flat = rgb.permute(0, 2, 3, 1).reshape(-1, 3)
        assert (flat[~fg] == 0).all()
        assert (flat[fg].sum(1) > 0).float().mean() > 0.9 and flat.max() == pytest.approx(1.0)
