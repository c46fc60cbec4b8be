"""DINO: self-distillation with no labels.

Caron et al., "Emerging Properties in Self-Supervised Vision Transformers", ICCV 2021;
official code facebookresearch/dino (`main_dino.py`).

A student (backbone + DINO head) is trained to match, on every other view, the centered and
sharpened output of a teacher that is an exponential moving average of the student. The teacher
sees only the global crops; the student sees all crops (multi-crop). Scheduled values (read from
`sched`, precomputed by the engine): `teacher_temp` (warmup 0.04 -> tau_t), `teacher_momentum`
(cosine 0.996 -> 1) and `freeze_last_layer` (1 while the head's last layer is frozen, the first
epoch in the paper).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from vfm.data.batch import Batch
from vfm.heads.dino_head import DINOHead
from vfm.losses.dino_loss import DINOLoss
from vfm.methods.base import Method, ema_update, make_ema_teacher


class MultiCropTower(nn.Module):
    """Backbone + head applied to a list of crops, one forward per resolution (crops of equal size
    are concatenated so each resolution is a single batched pass, as DINO's MultiCropWrapper)."""

    def __init__(self, backbone: nn.Module, head: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head

    def forward(self, crops: list[torch.Tensor]) -> torch.Tensor:
        """crops: list of [B, C, h_i, w_i] -> [len(crops) * B, K] in crop order."""
        outs, i = [], 0
        while i < len(crops):
            j = i
            while j < len(crops) and crops[j].shape[-2:] == crops[i].shape[-2:]:
                j += 1
            outs.append(self.backbone(torch.cat(crops[i:j])))
            i = j
        return self.head(torch.cat(outs))


class DINO(Method):
    """DINO method.

    Args:
        backbone: the encoder (any `vfm.backbones.Backbone`).
        out_dim: number of prototypes K (65536 in the paper).
        hidden_dim, bottleneck_dim, head_layers, use_bn_in_head, norm_last_layer: DINO head.
        student_temp: tau_s.
        center_momentum: center EMA momentum.
        n_global_crops: how many of the leading crops are global (seen by the teacher).
    """

    def __init__(
        self,
        backbone: nn.Module,
        *,
        out_dim: int = 65536,
        hidden_dim: int = 2048,
        bottleneck_dim: int = 256,
        head_layers: int = 3,
        use_bn_in_head: bool = False,
        norm_last_layer: bool = True,
        student_temp: float = 0.1,
        center_momentum: float = 0.9,
        n_global_crops: int = 2,
    ) -> None:
        super().__init__()
        head_kw = dict(
            hidden_dim=hidden_dim, bottleneck_dim=bottleneck_dim, nlayers=head_layers, use_bn=use_bn_in_head
        )
        embed_dim = int(backbone.embed_dim)
        self.student = MultiCropTower(backbone, DINOHead(embed_dim, out_dim, norm_last_layer=norm_last_layer, **head_kw))
        # The teacher starts as an exact copy of the student and is never trained by gradients.
        self.teacher = make_ema_teacher(self.student)
        self.loss_fn = DINOLoss(out_dim, student_temp=student_temp, center_momentum=center_momentum)
        self.n_global_crops = n_global_crops

    def training_step(self, batch: Batch, step: int, sched: Mapping[str, float]) -> dict[str, torch.Tensor]:
        crops: list[torch.Tensor] = batch["crops"]
        n_g = self.n_global_crops
        if len(crops) <= n_g:
            raise ValueError(f"DINO needs more than {n_g} crops (global + local), got {len(crops)}")
        with torch.no_grad():
            teacher_out = self.teacher(crops[:n_g])
        student_out = self.student(crops)
        loss = self.loss_fn(student_out.chunk(len(crops)), teacher_out.chunk(n_g), float(sched["teacher_temp"]))
        self.loss_fn.update_center(teacher_out)
        # Teacher entropy near log(out_dim) signals collapse to uniform, near 0 collapse to one prototype.
        return {"loss": loss, "teacher_entropy": self.loss_fn.last_teacher_entropy}

    def before_optimizer_step(self, step: int, sched: Mapping[str, float]) -> None:
        if sched.get("freeze_last_layer", 0.0) > 0:
            # As the official `cancel_gradients_last_layer`: no update (and no weight decay) at all.
            for p in self.student.head.last_layer_parameters():
                p.grad = None

    def on_step_end(self, step: int, sched: Mapping[str, float]) -> None:
        ema_update(self.teacher, self.student, float(sched["teacher_momentum"]))
