"""iBOT: masked image modelling with an online tokenizer.

Zhou et al., "iBOT: Image BERT Pre-Training with Online Tokenizer", ICLR 2022; official code
bytedance/ibot (`main_ibot.py`, `models/head.py`).

DINO's self-distillation on the [CLS] token across views, plus self-distillation on patch tokens:
the student sees the global crops with blockwise-masked patches (replaced by the backbone's mask
token, which starts at zero) and predicts, at every masked position, the teacher's output for the
*unmasked* patch of the same view. In the official ViT-S/16 run half of the global crops, drawn
independently, are not masked at all (`method.masking`: ratio 0 or U(0.1, 0.5)). The teacher
(the "online tokenizer") is the EMA of the student. Local crops are not masked and take part in
the [CLS] loss only.

    L = lambda_cls * L_cls + lambda_patch * L_patch
    L_cls   = DINO loss between teacher [CLS] of the global views and student [CLS] of all other views
    L_patch = mean over global views v and images b of
              sum_{i masked} -P_t(v, i) . log P_s(v, i) / #masked(b)

with separate centers and temperature schedules for [CLS] (`teacher_temp`) and patches
(`teacher_patch_temp`). `shared_head` uses one head for both kinds of token (the official
ViT-S/B setting); otherwise patches get their own head with `patch_out_dim` prototypes.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from vfm.data.batch import Batch
from vfm.heads.dino_head import DINOHead
from vfm.losses.dino_loss import DINOLoss
from vfm.losses.ibot_loss import iBOTPatchLoss
from vfm.methods.base import Method, ema_update, make_ema_teacher


def head_tokens(head: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """Apply a projection head to tokens [B, N, D] -> [B, N, K] (heads take 2-D input)."""
    b, n, d = tokens.shape
    return head(tokens.reshape(b * n, d)).reshape(b, n, -1)


class iBOTTower(nn.Module):
    """Backbone + [CLS] head + patch head (the same module when shared)."""

    def __init__(self, backbone: nn.Module, head: nn.Module, patch_head: nn.Module | None) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head
        self.patch_head = patch_head  # None: shared with `head`

    def forward_global(self, crops: list[torch.Tensor], masks: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Global crops (one resolution), optionally masked -> ([n*B, K] cls, [n*B, N, K'] patches)."""
        out = self.backbone.forward_tokens(torch.cat(crops), mask=masks)
        patch_head = self.patch_head if self.patch_head is not None else self.head
        return self.head(out["global"]), head_tokens(patch_head, out["patch"])

    def forward_local(self, crops: list[torch.Tensor]) -> torch.Tensor:
        return self.head(self.backbone(torch.cat(crops)))


class iBOT(Method):
    """iBOT method.

    Args:
        backbone: a ViT `vfm.backbones.Backbone` (patch tokens are required).
        out_dim: [CLS] prototypes (8192 in the official ViT-S/B runs).
        patch_out_dim: patch prototypes when `shared_head` is false.
        shared_head: one head for [CLS] and patch tokens.
        norm_last_layer, hidden_dim, bottleneck_dim, head_layers, use_bn_in_head: DINO-style head.
        lambda_cls, lambda_patch: loss weights (1 and 1 in the paper).
        student_temp: tau_s for both losses.
        center_momentum: EMA momentum of both centers.
        n_global_crops: how many leading crops are global (masked for the student, seen by the teacher).
    """

    needs_patch_tokens = True

    def __init__(
        self,
        backbone: nn.Module,
        *,
        out_dim: int = 8192,
        patch_out_dim: int = 8192,
        shared_head: bool = True,
        norm_last_layer: bool = True,
        hidden_dim: int = 2048,
        bottleneck_dim: int = 256,
        head_layers: int = 3,
        use_bn_in_head: bool = False,
        lambda_cls: float = 1.0,
        student_temp: float = 0.1,
        center_momentum: float = 0.9,
        lambda_patch: float = 1.0,
        n_global_crops: int = 2,
    ) -> None:
        super().__init__()
        backbone.enable_mask_token()  # zeros, as the official `masked_embed`
        embed_dim = int(backbone.embed_dim)

        def make_head(k: int) -> DINOHead:
            return DINOHead(embed_dim, k, hidden_dim=hidden_dim, bottleneck_dim=bottleneck_dim, nlayers=head_layers,
                            use_bn=use_bn_in_head, norm_last_layer=norm_last_layer)

        patch_dim = out_dim if shared_head else patch_out_dim
        self.student = iBOTTower(backbone, make_head(out_dim), None if shared_head else make_head(patch_out_dim))
        self.teacher = make_ema_teacher(self.student)
        self.cls_loss = DINOLoss(out_dim, student_temp=student_temp, center_momentum=center_momentum)
        self.patch_loss = iBOTPatchLoss(patch_dim, student_temp=student_temp, center_momentum=center_momentum)
        self.lambda_cls, self.lambda_patch = lambda_cls, lambda_patch
        self.n_global_crops = n_global_crops

    def training_step(self, batch: Batch, step: int, sched: Mapping[str, float]) -> dict[str, torch.Tensor]:
        crops: list[torch.Tensor] = batch["crops"]
        if "masks" not in batch:
            raise ValueError("iBOT needs patch masks in the batch: configure method.masking")
        n_g = self.n_global_crops
        masks = torch.cat(batch["masks"])  # [n_g * B, N]
        with torch.no_grad():
            t_cls, t_patch = self.teacher.forward_global(crops[:n_g], None)
        s_cls, s_patch = self.student.forward_global(crops[:n_g], masks)
        s_all = list(s_cls.chunk(n_g))
        if len(crops) > n_g:
            s_all += list(self.student.forward_local(crops[n_g:]).chunk(len(crops) - n_g))
        loss_cls = self.cls_loss(s_all, t_cls.chunk(n_g), float(sched["teacher_temp"]))
        # same view, masked student vs unmasked teacher; the per-image mean over the n_g * B images
        # equals the mean over views of the per-view means (views have equal batch sizes)
        loss_patch = self.patch_loss(s_patch, t_patch, masks, float(sched["teacher_patch_temp"]))
        self.cls_loss.update_center(t_cls)
        self.patch_loss.update_center(t_patch)
        loss = self.lambda_cls * loss_cls + self.lambda_patch * loss_patch
        return {"loss": loss, "loss_cls": loss_cls.detach(), "loss_patch": loss_patch.detach(),
                "mask_ratio": masks.float().mean()}

    def before_optimizer_step(self, step: int, sched: Mapping[str, float]) -> None:
        if sched.get("freeze_last_layer", 0.0) > 0:
            heads = [self.student.head] + ([self.student.patch_head] if self.student.patch_head is not None else [])
            for head in heads:
                for p in head.last_layer_parameters():
                    p.grad = None

    def on_step_end(self, step: int, sched: Mapping[str, float]) -> None:
        ema_update(self.teacher, self.student, float(sched["teacher_momentum"]))
