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
from typing import Any

import torch
from timm.layers import DropPath
from torch import Tensor, nn

from vfm.backbones.layer_decay import layer_decay_param_groups
from vfm.methods.supervised import Supervised

__all__ = ["Classifier", "set_drop_path"]

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
        **mixing: `label_smoothing`, `mixup`, `cutmix`, `mixup_prob`, `mixup_switch_prob`, as
            `Supervised` (which also builds the batches: no RandAugment here).
    """

    def __init__(
        self, encoder: nn.Module, *, num_classes: int, drop_path: float = 0.0, layer_decay: float = 1.0, **mixing: Any,
    ) -> None:
        backbone = copy.deepcopy(encoder).requires_grad_(True)
        set_drop_path(backbone, drop_path)
        if not isinstance(getattr(backbone, "embed_dim", None), int):
            # the Backbone contract's name for the feature size; plain timm CNNs call it num_features
            backbone.embed_dim = _num_features(backbone)
        # fine-tuning's batches: crop, flip and mixing only (no RandAugment, erasing or repeats)
        super().__init__(backbone, num_classes=num_classes, randaugment=None, erasing=0.0, repeated_aug=1, **mixing)
        nn.init.trunc_normal_(self.head.weight, std=2e-5)  # MAE's head init
        nn.init.zeros_(self.head.bias)
        self.layer_decay = float(layer_decay)

    def logits(self, images: Tensor) -> Tensor:
        """Class scores `[B, K]` of normalised images `[B, C, H, W]` (evaluation)."""
        return self.head(self.backbone(images))

    def param_groups(self) -> list[dict[str, Any]]:
        """Layer-wise lr decay (`lr_mult`) over the encoder's layers, the head at the full lr; no
        weight decay (`wd_mult` 0) on 1-D parameters, the position embedding and the tokens."""
        return layer_decay_param_groups(self, layer_decay=self.layer_decay)


def _num_features(encoder: nn.Module) -> int:
    value = getattr(encoder, "num_features", None)
    if not isinstance(value, int) or value <= 0:
        raise ValueError(f"fine-tuning needs the encoder's feature size: {type(encoder).__name__} has neither "
                         ".embed_dim nor .num_features")
    return value


def set_drop_path(model: nn.Module, rate: float, *, uniform: bool = False) -> list[float]:
    """Set stochastic depth on `model` in place, linearly from 0 (first block) to `rate` (last
    block), timm's rule (`torch.linspace(0, rate, depth)`), or `rate` in every block (`uniform`,
    DINOv2's `drop_path_uniform`); returns the per-block rates.

    Residual blocks are the modules with `drop_path1` / `drop_path2` (timm ViT, Swin, ...) or
    `drop_path` (ResNet, ConvNeXt, ...) slots, in module order. A slot becomes a `DropPath` of the
    block's rate: timm builds `nn.Identity` (ViT) or `None` (ResNet) for `drop_path_rate=0`, with
    no `drop_prob` to set.
    """
    def is_slot(m: nn.Module, s: str) -> bool:
        return hasattr(m, s) and (getattr(m, s) is None or isinstance(getattr(m, s), (nn.Identity, DropPath)))

    blocks = [m for m in model.modules() if not isinstance(m, DropPath) and any(is_slot(m, s) for s in _DROP_PATH_SLOTS)]
    rates = [float(rate)] * len(blocks) if uniform else [x.item() for x in torch.linspace(0, rate, len(blocks))]
    for block, r in zip(blocks, rates, strict=True):
        for s in _DROP_PATH_SLOTS:
            if is_slot(block, s):
                setattr(block, s, DropPath(r))
    return rates
