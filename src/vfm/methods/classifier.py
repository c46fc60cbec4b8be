"""Fine-tuning's classifier: a copy of a pretrained encoder plus a linear head, trained end to end.

He et al., "Masked Autoencoders Are Scalable Vision Learners", CVPR 2022, Appendix A.1
(facebookresearch/mae `main_finetune.py`, `util/lr_decay.py`): the head is `nn.Linear(dim, K)`
with weights trunc-normal of std 2e-5 and bias 0 (a near-zero head keeps the first gradients from
wrecking the pretrained features while it is still random); BEiT's layer-wise lr decay (Bao et al.,
ICLR 2022): block `i` of a depth-`L` ViT trains at `lr * layer_decay ** (L - i)`, the embeddings
at `layer_decay ** (L + 1)`, the head at the full lr; DeiT's stochastic depth, mixup / cutmix and
label smoothing (Touvron et al., ICML 2021).

The loss and the batches are supervised pretraining's (`vfm.methods.supervised`): soft-target
cross-entropy against the mixed, smoothed targets of `SupervisedCollate` (without mixing its
targets are the smoothed one-hot labels, i.e. cross-entropy with label smoothing). MAE pools the
patch tokens + `fc_norm`; we keep the encoder's own global feature (the [CLS] token after the
final norm for our ViTs, the pooled feature for CNNs), so any `Backbone` or plain timm model works.
"""

from __future__ import annotations

import copy
import re
from typing import Any

import torch
from timm.layers import DropPath
from torch import Tensor, nn

from vfm.methods.supervised import Supervised

__all__ = ["Classifier", "layer_decay_param_groups", "set_drop_path"]

# Never weight-decayed besides 1-D parameters and biases: the position embedding and the learnable
# tokens (timm's VisionTransformer.no_weight_decay() + registers and our mask token).
NO_WEIGHT_DECAY = frozenset({"pos_embed", "cls_token", "dist_token", "reg_token", "mask_token"})
_EMBED_RE = re.compile(r"^(cls_token|pos_embed|reg_token|dist_token|mask_token|patch_embed\.)")
_BLOCK_RE = re.compile(r"^blocks\.(\d+)\.")
_DROP_PATH_SLOTS = ("drop_path", "drop_path1", "drop_path2")


class Classifier(Supervised):
    """`head(encoder(x))` on a deep copy of `encoder` (the caller's module is never touched), every
    parameter of the copy trainable (MAE also trains what pretraining froze, e.g. a fixed sin-cos
    position embedding).

    Args:
        encoder: a `Backbone` or a plain timm model (`.num_features`) returning global features [B, D].
        num_classes: K.
        drop_path: stochastic depth of the last block, linear over depth from 0 (timm's rule).
        layer_decay: layer-wise lr decay (1: none).
        label_smoothing, mixup, cutmix, mixup_prob, mixup_switch_prob: as `Supervised` (no RandAugment).
    """

    def __init__(
        self,
        encoder: nn.Module,
        *,
        num_classes: int,
        drop_path: float = 0.0,
        layer_decay: float = 1.0,
        label_smoothing: float = 0.1,
        mixup: float = 0.8,
        cutmix: float = 1.0,
        mixup_prob: float = 1.0,
        mixup_switch_prob: float = 0.5,
    ) -> None:
        backbone = copy.deepcopy(encoder).requires_grad_(True)
        set_drop_path(backbone, drop_path)
        if not isinstance(getattr(backbone, "embed_dim", None), int):
            # the Backbone contract's name for the feature size; plain timm CNNs call it num_features
            backbone.embed_dim = _num_features(backbone)
        super().__init__(
            backbone, num_classes=num_classes, label_smoothing=label_smoothing, mixup=mixup, cutmix=cutmix,
            mixup_prob=mixup_prob, mixup_switch_prob=mixup_switch_prob, randaugment=None,
        )
        nn.init.trunc_normal_(self.head.weight, std=2e-5)  # MAE's head init
        nn.init.zeros_(self.head.bias)
        self.layer_decay = float(layer_decay)

    def logits(self, images: Tensor) -> Tensor:
        """Class scores `[B, K]` of normalised images `[B, C, H, W]` (evaluation)."""
        return self.head(self.backbone(images))

    def param_groups(self) -> list[dict[str, Any]]:
        """Layer-wise lr decay groups (`lr_mult`), no weight decay (`wd_mult` 0) on 1-D parameters,
        biases, the position embedding and the tokens."""
        groups = layer_decay_param_groups(self, base_lr=1.0, weight_decay=1.0, layer_decay=self.layer_decay)
        return [
            {"params": g["params"], "param_names": g["param_names"], "lr_mult": g["lr_scale"],
             "wd_mult": g["weight_decay"], "layer_id": g["layer_id"], "name": g["name"]}
            for g in groups
        ]


def _num_features(encoder: nn.Module) -> int:
    value = getattr(encoder, "num_features", None)
    if not isinstance(value, int) or value <= 0:
        raise ValueError(f"fine-tuning needs the encoder's feature size: {type(encoder).__name__} has neither "
                         ".embed_dim nor .num_features")
    return value


def set_drop_path(model: nn.Module, rate: float) -> list[float]:
    """Set stochastic depth on `model` in place, linearly from 0 (first block) to `rate` (last
    block), timm's rule (`torch.linspace(0, rate, depth)`); returns the per-block rates.

    Residual blocks are the modules with `drop_path1` / `drop_path2` (timm ViT, Swin, ...) or
    `drop_path` (ResNet, ConvNeXt, ...) slots, in module order. A slot becomes a `DropPath` of the
    block's rate: timm builds `nn.Identity` (ViT) or `None` (ResNet) for `drop_path_rate=0`, with
    no `drop_prob` to set.
    """
    def is_slot(m: nn.Module, s: str) -> bool:
        return hasattr(m, s) and (getattr(m, s) is None or isinstance(getattr(m, s), (nn.Identity, DropPath)))

    blocks = [m for m in model.modules() if not isinstance(m, DropPath) and any(is_slot(m, s) for s in _DROP_PATH_SLOTS)]
    rates = [x.item() for x in torch.linspace(0, rate, len(blocks))]
    for block, r in zip(blocks, rates, strict=True):
        for s in _DROP_PATH_SLOTS:
            if is_slot(block, s):
                setattr(block, s, DropPath(r))
    return rates


def _find_vit(model: nn.Module) -> tuple[str, nn.Module] | None:
    """`(name prefix, module)` of the first timm-style ViT in `model` (a module with `patch_embed`
    and a sequence of `blocks`): behind a `Backbone`, a classifier, or a plain timm model."""
    for name, module in model.named_modules():
        if hasattr(module, "patch_embed") and isinstance(getattr(module, "blocks", None), (nn.Sequential, nn.ModuleList)):
            return (f"{name}." if name else ""), module
    return None


def _layer_id(name: str, prefix: str, num_layers: int) -> int:
    rel = name[len(prefix):] if name.startswith(prefix) else None
    if (rel is not None and _EMBED_RE.match(rel)) or name.rsplit(".", 1)[-1] == "mask_token":
        return 0  # the Backbone's mask_token sits next to (not inside) the timm model
    block = _BLOCK_RE.match(rel) if rel is not None else None
    return int(block.group(1)) + 1 if block is not None else num_layers + 1


def layer_decay_param_groups(
    model: nn.Module, *, base_lr: float, weight_decay: float, layer_decay: float,
) -> list[dict[str, Any]]:
    """Optimizer parameter groups with BEiT/MAE layer-wise lr decay (MAE `param_groups_lrd`).

    For the timm ViT inside `model` (`L` blocks), layer id 0 is `cls_token`, `pos_embed`,
    `reg_token`, `mask_token`, `patch_embed.*`; `i + 1` is `blocks.i.*`; `L + 1` everything else
    (final norm, the head even outside the ViT); the lr scale is `layer_decay ** (L + 1 - id)`.
    One group per (layer id, decay / no decay), ordered by layer id, frozen parameters left out.
    Without ViT blocks (CNNs) two groups, decay and no decay, at scale 1. Each group holds `params`,
    `param_names`, `lr_scale`, `lr` (`base_lr * lr_scale`), `weight_decay`, `layer_id`, `name`.
    """
    found = _find_vit(model)
    names = set(NO_WEIGHT_DECAY)
    prefix, num_layers = "", 0
    if found is not None:
        prefix, vit = found
        num_layers = len(vit.blocks)
        nwd = getattr(vit, "no_weight_decay", None)  # timm's own list, as MAE's main_finetune uses
        names |= set(nwd()) if callable(nwd) else set()
    groups: dict[tuple[int, bool], dict[str, Any]] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        layer_id = _layer_id(name, prefix, num_layers) if found is not None else 0
        scale = layer_decay ** (num_layers + 1 - layer_id) if found is not None else 1.0
        # decaying norm scales, biases or the position embedding only shrinks them towards zero
        skip_wd = param.ndim <= 1 or name.endswith(".bias") or name.rsplit(".", 1)[-1] in names or name in names
        tag = "no_decay" if skip_wd else "decay"
        group = groups.setdefault((layer_id, skip_wd), {
            "params": [], "param_names": [], "lr_scale": scale, "lr": base_lr * scale,
            "weight_decay": 0.0 if skip_wd else weight_decay, "layer_id": layer_id,
            "name": f"layer_{layer_id}_{tag}" if found is not None else tag,
        })
        group["params"].append(param)
        group["param_names"].append(name)
    return [groups[k] for k in sorted(groups)]
