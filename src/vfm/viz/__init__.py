"""Visualisations of an encoder: DINO's last-layer attention maps and DINOv2's patch-feature PCA."""

from vfm.viz.attention import (
    as_vision_transformer,
    attention_threshold_mask,
    cls_attention,
    last_block_attention,
    last_layer_attention,
    patch_grid,
)
from vfm.viz.pca import patch_pca_rgb, patch_tokens, principal_components
from vfm.viz.render import attention_grid, colormap, pca_grid, render_figures, save_png

__all__ = [
    "as_vision_transformer",
    "attention_grid",
    "attention_threshold_mask",
    "cls_attention",
    "colormap",
    "last_block_attention",
    "last_layer_attention",
    "patch_grid",
    "patch_pca_rgb",
    "patch_tokens",
    "pca_grid",
    "principal_components",
    "render_figures",
    "save_png",
]
