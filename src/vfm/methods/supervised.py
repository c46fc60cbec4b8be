"""Supervised pretraining: a classifier on labels, DeiT-style.

Touvron et al., "Training data-efficient image transformers & distillation through attention",
ICML 2021 (facebookresearch/deit `main.py`): cross-entropy with label smoothing 0.1, Mixup (alpha
0.8) and CutMix (alpha 1.0) switched per batch with probability 0.5, RandomResizedCrop + flip, then
RandAugment `rand-m9-mstd0.5-inc1`, random erasing 0.25 (pixel mode), repeated augmentation (each
image 3 times per batch, `RASampler`), AdamW with lr 5e-4 x batch / 512, weight decay 0.05,
stochastic depth. The augmentations, Mixup/CutMix (timm `Mixup`, which also smooths the labels)
and the repeats run in the data pipeline (`SupervisedCollate`, `SeededBatchSampler`), seeded by
the batch seed. The loss is the soft-target cross-entropy against the mixed, smoothed labels.
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
        randaugment: timm RandAugment config string ("" or None disables it), applied to the crop.
        erasing: random erasing probability (DeiT `--reprob`; 0 disables it); erasing_mode "pixel",
            "rand" or "const" (`--remode`); erasing_count the most boxes per image (`--recount`).
        repeated_aug: how many times each image appears per batch (DeiT `--repeated-aug`: 3; 1: off).
    """

    token_weight_decay = False  # DeiT's timm `create_optimizer` skips no_weight_decay(): pos_embed, cls_token

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
        erasing: float = 0.25,
        erasing_mode: str = "pixel",
        erasing_count: int = 1,
        repeated_aug: int = 3,
    ) -> None:
        super().__init__()
        if num_classes < 2:
            raise ValueError(f"supervised pretraining needs labels: dataset.num_classes={num_classes}")
        if repeated_aug < 1:
            raise ValueError(f"method.repeated_aug must be >= 1 (1 turns repeated augmentation off), got {repeated_aug}")
        if not 0.0 <= erasing <= 1.0:
            raise ValueError(f"method.erasing is a probability in [0, 1], got {erasing}")
        self.backbone = backbone
        self.head = linear_head(int(backbone.embed_dim), num_classes)
        self.num_classes, self.label_smoothing = num_classes, label_smoothing
        self.mixup, self.cutmix, self.mixup_prob, self.mixup_switch_prob = mixup, cutmix, mixup_prob, mixup_switch_prob
        self.randaugment = randaugment or None
        self.erasing, self.erasing_mode, self.erasing_count = erasing, erasing_mode, erasing_count
        self.repeated_aug = repeated_aug

    @property
    def encoder(self) -> nn.Module:
        return self.backbone

    def build_collate(self, augment: Any, masking: Callable[..., Tensor] | None = None) -> SupervisedCollate:
        """Crop and flip, RandAugment, random erasing, then Mixup/CutMix and label smoothing into soft
        `target`s (no masks); the collate also carries the repeated augmentation to the sampler."""
        return SupervisedCollate(
            augment, num_classes=self.num_classes, label_smoothing=self.label_smoothing, mixup=self.mixup,
            cutmix=self.cutmix, mixup_prob=self.mixup_prob, mixup_switch_prob=self.mixup_switch_prob,
            randaugment=self.randaugment, erasing=self.erasing, erasing_mode=self.erasing_mode,
            erasing_count=self.erasing_count, repeats=self.repeated_aug,
        )

    def training_step(self, batch: Batch, step: int, sched: Mapping[str, float]) -> dict[str, Tensor]:
        logits = self.head(self.backbone(batch["crops"][0])).float()
        target = batch["target"]  # [B, K] soft targets (mixed and smoothed)
        loss = torch.sum(-target * torch.log_softmax(logits, dim=-1), dim=-1).mean()
        acc = (logits.argmax(-1) == batch["label"]).float().mean()  # against the unmixed labels
        return {"loss": loss, "train_acc": acc.detach()}
