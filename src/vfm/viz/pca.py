"""Patch-feature PCA rendered as RGB, as in DINOv2.

DINOv2 (Oquab et al., *DINOv2: Learning Robust Visual Features without Supervision*, TMLR 2024,
Fig. 1 and Sec. 7.3) fits one PCA on the patch features of several images together, thresholds the
first component to separate foreground from background, fits a second PCA on the foreground patches
only, and shows its first three components as RGB: parts that correspond across images get the same
colour. The PCA here is an exact SVD of the centred features (deterministic, unlike the randomised
`torch.pca_lowrank`; a few images give at most a few thousand patches), with a fixed sign per
component so the same features always give the same colours.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from vfm.viz.attention import as_vision_transformer, patch_grid

__all__ = ["minmax_scale", "patch_pca_rgb", "patch_tokens", "principal_components"]


def patch_tokens(model: nn.Module, x: Tensor) -> tuple[Tensor, tuple[int, int]]:
    """Final-norm patch tokens [B, N, D] of a ViT (vfm `Backbone` or plain timm) and their (H, W) grid.

    These are the features DINOv2 runs PCA on (`x_norm_patchtokens`): the output of the last block
    after the final LayerNorm, without the [CLS] and register tokens.
    """
    vit = as_vision_transformer(model)
    tokens = vit.forward_features(x)
    return tokens[:, int(vit.num_prefix_tokens) :], patch_grid(vit, x)


def principal_components(features: Tensor, n_components: int) -> tuple[Tensor, Tensor, Tensor]:
    """PCA of `features` [M, D]: (projections [M, k], components [k, D], mean [D]).

    Components are unit vectors in decreasing order of explained variance. Sign convention: each
    component's largest-magnitude loading is positive (an SVD fixes components only up to sign, and
    a flipped sign would swap colours between otherwise identical runs). When fewer than `k`
    directions exist (M or D too small), the missing components are zero.
    """
    if features.ndim != 2:
        raise ValueError(f"features must be [M, D], got shape {tuple(features.shape)}")
    if n_components < 1:
        raise ValueError(f"n_components must be >= 1, got {n_components}")
    x = features.float()
    mean = x.mean(dim=0)
    centred = x - mean
    _, _, vh = torch.linalg.svd(centred, full_matrices=False)
    comps = vh[:n_components]
    pivot = comps.abs().argmax(dim=1, keepdim=True)
    signs = torch.sign(comps.gather(1, pivot))
    comps = comps * torch.where(signs == 0, torch.ones_like(signs), signs)
    if comps.shape[0] < n_components:
        comps = torch.cat([comps, comps.new_zeros(n_components - comps.shape[0], comps.shape[1])])
    return centred @ comps.T, comps, mean


def minmax_scale(values: Tensor, dim: int = 0) -> Tensor:
    """Scale to [0, 1] along `dim` (per component); a constant component maps to 0."""
    lo = values.amin(dim=dim, keepdim=True)
    span = values.amax(dim=dim, keepdim=True) - lo
    return torch.where(span > 0, (values - lo) / span.clamp_min(torch.finfo(values.dtype).tiny), torch.zeros_like(values))


def patch_pca_rgb(
    patch_tokens: Tensor,
    grid: tuple[int, int],
    *,
    n_components: int = 3,
    foreground_threshold: float | None = None,
) -> Tensor:
    """Joint PCA of the patch features of a few images, as an RGB image per input: [B, 3, H, W] in [0, 1].

    Args:
        patch_tokens: [B, N, D] patch features (no [CLS]/register tokens), N = H * W row-major.
        grid: the patch grid (H, W).
        n_components: how many leading components become channels (1 to 3): 3 gives R, G, B;
            2 gives R, G (B = 0); 1 gives a grey map. Each is min-max scaled over all images jointly,
            so colours are comparable across the images.
        foreground_threshold: DINOv2's background removal. The first component of a PCA on all
            patches is min-max scaled and patches above the threshold are foreground; the colours
            then come from a second PCA on the foreground patches only, and the background is black.
            The first component's sign is ambiguous, so it is oriented so that the patches on the
            image border (background in object-centric images) score lower than the rest.
    """
    if patch_tokens.ndim != 3:
        raise ValueError(f"patch_tokens must be [B, N, D], got shape {tuple(patch_tokens.shape)}")
    b, n, d = patch_tokens.shape
    h, w = int(grid[0]), int(grid[1])
    if h * w != n:
        raise ValueError(f"grid {h}x{w} does not match {n} patch tokens")
    if not 1 <= n_components <= 3:
        raise ValueError(f"n_components must be 1, 2 or 3 (one per RGB channel), got {n_components}")
    feats = patch_tokens.detach().reshape(b * n, d).float()
    keep = torch.ones(b * n, dtype=torch.bool, device=feats.device)
    if foreground_threshold is not None:
        if not 0.0 <= foreground_threshold <= 1.0:
            raise ValueError(f"foreground_threshold must be in [0, 1] (first component after min-max), got {foreground_threshold}")
        first = principal_components(feats, 1)[0][:, 0]
        border = torch.ones(h, w, dtype=torch.bool, device=feats.device)
        if h > 2 and w > 2:
            border[1:-1, 1:-1] = False
            border = border.flatten().repeat(b)
            if first[border].mean() > first[~border].mean():
                first = -first
        keep = minmax_scale(first) > foreground_threshold
    out = feats.new_zeros(b * n, 3)
    if keep.any():
        proj = principal_components(feats[keep], n_components)[0]
        scaled = minmax_scale(proj)
        if n_components == 1:
            scaled = scaled.expand(-1, 3)
        out[keep, :n_components if n_components > 1 else 3] = scaled
    return out.reshape(b, h, w, 3).permute(0, 3, 1, 2).contiguous()
