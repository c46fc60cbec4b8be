"""Which tokens of a frozen encoder form its feature vector: the feature *recipes* of the
linear-probe protocols (DINO, Caron et al. 2021, facebookresearch/dino ``eval_linear.py``;
iBOT ``evaluation/eval_linear.py``; DINOv2 ``dinov2/eval/linear.py``).

``GLOBAL`` is the encoder's own output (a ViT's final-norm [CLS], a CNN's pooled feature); the
other recipes concatenate the [CLS] token of the last ``n`` blocks, each after the final norm,
optionally with the mean of the last block's patch tokens. A ViT gives them all from one forward
(timm's ``forward_intermediates``); an encoder without a [CLS] token falls back to ``GLOBAL``.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from vfm.backbones.timm_backbone import Backbone, select_attention

log = logging.getLogger(__name__)

GLOBAL = "global"
# recipe -> (n: the [CLS] tokens of the last n blocks, concatenated oldest first; avgpool: append
# the mean of the last block's patch tokens). Every block output goes through the final norm
# first, as in DINO's ``get_intermediate_layers``.
RECIPES: dict[str, tuple[int, bool]] = {
    "cls": (1, False),
    "last4_cls": (4, False),  # DINO / iBOT ViT-S
    "cls_avgpool": (1, True),  # DINO / iBOT ViT-B
    "last4_cls_avgpool": (4, True),  # the superset DINOv2's grid slices its four recipes from
}


def token_backbone(encoder: nn.Module) -> Backbone | None:
    """``encoder`` when it can give the [CLS] token of its last blocks (a ViT `Backbone` with a
    class token), else ``None`` (CNNs, ViTs without [CLS], other modules: global feature only)."""
    if isinstance(encoder, Backbone) and encoder.has_patch_tokens and getattr(encoder.model, "cls_token", None) is not None:
        return encoder
    return None


def last_blocks(encoder: Backbone, x: Tensor, n: int) -> tuple[Tensor, list[tuple[Tensor, Tensor]]]:
    """One forward of a ViT `Backbone` that also keeps the last ``n`` blocks' tokens.

    Args:
        encoder: a ViT `Backbone` (timm ``forward_intermediates``).
        x: normalised images ``[B, C, H, W]``.
        n: how many of the last blocks to keep; clamped to the depth.

    Returns:
        ``(global [B, D], [(prefix [B, P, D], patch [B, N, D]) for each of the last n blocks,
        oldest first])``: every block output after the final norm (DINO's
        ``get_intermediate_layers``); ``global`` is exactly ``encoder(x)``.
    """
    model = encoder.model
    select_attention(model, encoder.attn_impl, x.device.type)
    n = min(n, len(model.blocks))
    final, blocks = model.forward_intermediates(x, indices=n, return_prefix_tokens=True, norm=True, output_fmt="NLC")
    return model.forward_head(final, pre_logits=True), [(prefix, patch) for patch, prefix in blocks]


def recipe_features(blocks: Sequence[tuple[Tensor, Tensor]], recipe: str) -> Tensor:
    """The linear-probe input of ``recipe`` from ``last_blocks``' output: ``[B, (n + avgpool) * D]``.

    DINO's ``eval_linear.py`` interleaves [CLS] and patch-mean columns for ``cls_avgpool``; here
    they are concatenated (DINOv2's ``create_linear_input``): a permutation of the same columns,
    which a linear layer on per-dimension normalised features does not see.
    """
    n, avgpool = RECIPES[recipe]
    kept = blocks[-n:]
    parts = [prefix[:, 0] for prefix, _ in kept]
    if avgpool:
        parts.append(kept[-1][1].mean(dim=1))
    return torch.cat(parts, dim=-1)


def extraction_plan(encoder: nn.Module, recipes: Sequence[str]) -> dict[str, str]:
    """recipe asked for -> recipe the encoder gives: a recipe of ``RECIPES`` falls back to
    ``GLOBAL`` (with a log line) for an encoder without a [CLS] token of its last blocks."""
    unknown = [r for r in recipes if r != GLOBAL and r not in RECIPES]
    if unknown:
        raise ValueError(f"unknown feature recipe {unknown[0]!r}; choose one of {GLOBAL}, {', '.join(RECIPES)}")
    plan = {r: r for r in recipes}
    backbone = token_backbone(encoder)
    asked = sorted(r for r in recipes if r != GLOBAL)
    if backbone is None and asked:
        log.info("features %s need the [CLS] token of a ViT's last blocks; %s has none: using its pooled global "
                 "feature instead", ", ".join(asked), getattr(encoder, "name", type(encoder).__name__))
        return {r: GLOBAL for r in recipes}
    depth = len(backbone.model.blocks) if backbone is not None else 0
    for r in asked:
        n, avgpool = RECIPES[r]
        if n > depth:  # e.g. last4_cls on a 2-block test model: the last block only
            plan[r] = "cls_avgpool" if avgpool else "cls"
            log.info("features %s: the encoder has %d blocks; using %s", r, depth, plan[r])
    return plan


def encode(encoder: nn.Module, x: Tensor, recipes: Sequence[str]) -> dict[str, Tensor]:
    """{recipe: [B, D_recipe]} from one forward; ``recipes`` come from `extraction_plan`."""
    if all(r == GLOBAL for r in recipes):
        out = encoder(x)
        if not isinstance(out, Tensor) or out.ndim != 2 or out.shape[0] != x.shape[0]:
            shape = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
            raise ValueError(f"encoder must return global features [B, D]; got {shape} for B={x.shape[0]}")
        return {GLOBAL: out}
    backbone = token_backbone(encoder)
    assert backbone is not None  # extraction_plan
    glob, blocks = last_blocks(backbone, x, max(RECIPES[r][0] for r in recipes if r != GLOBAL))
    return {r: glob if r == GLOBAL else recipe_features(blocks, r) for r in recipes}
