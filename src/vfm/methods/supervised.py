"""Supervised pretraining: a classifier on labels, DeiT-style.

Touvron et al., "Training data-efficient image transformers & distillation through attention",
ICML 2021 (facebookresearch/deit `main.py`): cross-entropy with label smoothing 0.1, Mixup (alpha
0.8) and CutMix (alpha 1.0) switched per batch with probability 0.5, RandAugment
`rand-m9-mstd0.5-inc1`, AdamW with lr 5e-4 x batch / 512, weight decay 0.05, stochastic depth.
Mixup/CutMix (timm `Mixup`, which also smooths the labels) and RandAugment (timm
`rand_augment_transform`) run in the data pipeline (`SupervisedCollate`), seeded by the batch seed.
The loss is the soft-target cross-entropy against the mixed, smoothed labels.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from vfm.data.batch import Batch
from vfm.data.collate import SupervisedCollate
from vfm.methods.base import Method, linear_head


class Supervised(Method):
    """Args:
        backbone: any `Backbone` (ViT or CNN).
        num_classes: classes of the dataset (`${dataset.num_classes}`).
        label_smoothing: applied to the one-hot targets (inside Mixup when it is on).
        mixup, cutmix: Beta(alpha, alpha) parameters (0 disables each).
        mixup_prob: probability of mixing a batch at all; mixup_switch_prob: of CutMix instead of Mixup.
        randaugment: timm RandAugment config string ("" or None disables it).
    """

    def __init__(
        self,
        backbone: nn.Module,
        *,
        num_classes: int,
        label_smoothing: float = 0.1,
        mixup: float = 0.8,
        cutmix: float = 1.0,
        mixup_prob: float = 1.0,
        mixup_switch_prob: float = 0.5,
        randaugment: str | None = "rand-m9-mstd0.5-inc1-mmax9",
    ) -> None:
        super().__init__()
        if num_classes < 2:
            raise ValueError(f"supervised pretraining needs labels: dataset.num_classes={num_classes}")
        self.backbone = backbone
        self.head = linear_head(int(backbone.embed_dim), num_classes)
        self.num_classes, self.label_smoothing = num_classes, label_smoothing
        self.mixup, self.cutmix, self.mixup_prob, self.mixup_switch_prob = mixup, cutmix, mixup_prob, mixup_switch_prob
        self.randaugment = randaugment or None

    @property
    def encoder(self) -> nn.Module:
        return self.backbone

    def build_collate(self, augment: Any, masking: Callable[..., Tensor] | None = None) -> SupervisedCollate:
        """RandAugment, then Mixup/CutMix and label smoothing into soft `target`s (no masks)."""
        return SupervisedCollate(
            augment, num_classes=self.num_classes, label_smoothing=self.label_smoothing, mixup=self.mixup,
            cutmix=self.cutmix, mixup_prob=self.mixup_prob, mixup_switch_prob=self.mixup_switch_prob,
            randaugment=self.randaugment,
        )

    def training_step(self, batch: Batch, step: int, sched: Mapping[str, float]) -> dict[str, Tensor]:
        logits = self.head(self.backbone(batch["crops"][0])).float()
        target = batch["target"]  # [B, K] soft targets (mixed and smoothed)
        loss = torch.sum(-target * torch.log_softmax(logits, dim=-1), dim=-1).mean()
        acc = (logits.argmax(-1) == batch["label"]).float().mean()  # against the unmixed labels
        return {"loss": loss, "train_acc": acc.detach()}
