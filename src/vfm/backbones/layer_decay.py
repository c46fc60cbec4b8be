"""Layer-wise learning-rate decay (BEiT, MAE, DINOv2) for any timm model, through timm's group matchers.

Fine-tuning lowers the lr of a pretrained encoder's early layers, whose features are the most
general, geometrically from the head down (Bao et al., "BEiT", ICLR 2022; He et al., "MAE",
CVPR 2022, `util/lr_decay.py`); DINOv2 pretrains with it too. Which parameters form a "layer" is
what timm's `group_matcher` tells for each of its architectures (the stem, then one group per
block), the same source as timm's `param_groups_layer_decay`, so ViTs and CNNs get it alike.
"""

from __future__ import annotations

from collections.abc import Collection
from fnmatch import fnmatchcase
from typing import Any

from timm.models._manipulate import MATCH_PREV_GROUP, group_with_matcher
from torch import nn

__all__ = ["NO_WEIGHT_DECAY", "layer_decay_param_groups"]

# Parameters that never get weight decay besides the 1-D ones (norm scales, biases): the position
# embedding and the learnable tokens (timm's VisionTransformer.no_weight_decay(), the registers
# and the Backbone's mask token). Decaying them only shrinks them (MAE / BEiT / DeiT convention).
NO_WEIGHT_DECAY: tuple[str, ...] = ("pos_embed", "cls_token", "dist_token", "reg_token", "mask_token")
# Stand-in name for the parameters around the timm model (a classifier head): timm files a name its
# group matcher does not know in the last layer, which is where the head belongs.
_HEAD = "\x00head"


def _timm_model(model: nn.Module) -> tuple[str, nn.Module] | None:
    """`(name prefix, module)` of the first timm model inside `model` (itself included): the first
    module with a `group_matcher`, so it is found behind a `Backbone` (`model.`), behind a classifier
    or a method's tower wrapping one, or as the plain timm model (`""`)."""
    for name, module in model.named_modules():
        if callable(getattr(module, "group_matcher", None)):
            return (f"{name}." if name else ""), module
    return None


def _layer_ids(model: nn.Module) -> tuple[dict[str, int], int]:
    """Layer id of every parameter of `model` (by name) and the id `L + 1` of the head's layer.

    timm's group matcher orders the timm model's parameters: stem (patch embedding, tokens) 0, then
    one id per block. It attaches a ViT's final norm to the last block (`MATCH_PREV_GROUP`); BEiT,
    MAE and DINOv2 give it the full lr with the head, so those entries are dropped and the final
    norm lands, with every other parameter the matcher does not know (`fc_norm`, a timm head), in
    layer `L + 1`. Outside the timm model, the Backbone's `mask_token` is an embedding (layer 0) and
    everything else (a classifier head, a method's projection heads) is in layer `L + 1`. A model
    without a timm model inside has a single layer 0.
    """
    found = _timm_model(model)
    if found is None:
        return {}, 0
    prefix, timm_model = found
    matcher = timm_model.group_matcher(coarse=False)
    if isinstance(matcher, dict):
        matcher = {
            group: [s for s in spec if s[1] != MATCH_PREV_GROUP] if isinstance(spec, (list, tuple)) else spec
            for group, spec in matcher.items()
        }
    names = [n for n, _ in timm_model.named_parameters()] + [_HEAD]
    inner = group_with_matcher(((n, None) for n in names), matcher, reverse=True)
    top = inner[_HEAD]
    ids = {}
    for name, _ in model.named_parameters():
        rel = name[len(prefix):] if name.startswith(prefix) else None
        if rel in inner:
            ids[name] = inner[rel]
        else:
            ids[name] = 0 if name.rsplit(".", 1)[-1] == "mask_token" else top
    return ids, top


def layer_decay_param_groups(
    model: nn.Module,
    *,
    layer_decay: float,
    weight_decay: float | None = None,
    no_weight_decay: Collection[str] = NO_WEIGHT_DECAY,
) -> list[dict[str, Any]]:
    """Optimizer parameter groups with BEiT / MAE layer-wise lr decay, for any timm model.

    Layers come from timm's group matchers (see `_layer_ids`), so ViTs and CNNs alike get them:
    for a ViT with `L` blocks, the embeddings (patch embedding, [CLS], registers, position
    embedding, mask token) are layer 0, block `i` is layer `i + 1` and the rest (final norm, heads)
    layer `L + 1`; a ResNet's stem is layer 0 and each residual block one layer. A parameter of
    layer `l` trains with `lr_mult = layer_decay ** (L + 1 - l)`: the head at the full lr, the
    embeddings `layer_decay ** (L + 1)` (MAE `param_groups_lrd`; timm's `param_groups_layer_decay`
    reads the same matchers but trains a ViT's final norm with its last block).

    No weight decay (`wd_mult` 0) for 1-D parameters (norm scales, biases) and for parameters whose
    full name or last name component matches a pattern of `no_weight_decay` (`fnmatch` patterns,
    plain names match exactly); `wd_mult` 1 for the rest. Frozen parameters are left out.

    Returns one group per (layer, decay / no decay), ordered by layer, decaying group first; each
    has `params`, `param_names`, `lr_mult`, `wd_mult`, `layer_id` and `name` (`layer_3_decay`),
    the format of `Method.param_groups` (`set_optimizer_values` scales the scheduled lr and weight
    decay by the multipliers). With `weight_decay` set, each group also carries its fixed
    `weight_decay` (`weight_decay * wd_mult`), for optimizers used without a schedule.
    """
    ids, top = _layer_ids(model)
    groups: dict[tuple[int, bool], dict[str, Any]] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        layer = ids.get(name, 0)
        leaf = name.rsplit(".", 1)[-1]
        no_decay = param.ndim <= 1 or any(fnmatchcase(name, pat) or fnmatchcase(leaf, pat) for pat in no_weight_decay)
        key = (layer, no_decay)
        if key not in groups:
            groups[key] = {
                "params": [],
                "param_names": [],
                "lr_mult": layer_decay ** (top - layer),
                "wd_mult": 0.0 if no_decay else 1.0,
                "layer_id": layer,
                "name": f"layer_{layer}_{'no_decay' if no_decay else 'decay'}",
            }
            if weight_decay is not None:
                groups[key]["weight_decay"] = 0.0 if no_decay else weight_decay
        groups[key]["params"].append(param)
        groups[key]["param_names"].append(name)
    return [groups[k] for k in sorted(groups)]
