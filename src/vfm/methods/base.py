"""The one small interface every pretraining method implements (DESIGN: "at most one small base").

The engine calls, per optimisation step: `forward(batch, step, sched)` (= `training_step`, routed
through `forward` so DDP sees the call), then backward, `before_optimizer_step`, the optimizer
step, and `on_step_end` (EMA teachers, centers). `sched` holds this step's value of every schedule
named in the method's config (`method.schedules`), precomputed by the engine.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn


class Method(nn.Module):
    #: True for methods that consume patch tokens (iBOT, MAE, ...); validated before training
    needs_patch_tokens: bool = False
    #: attributes holding frozen networks (EVA's teacher, BEiT's tokenizer): kept in eval mode
    #: (no dropout, drop path or BatchNorm updates) whatever mode the method is in
    frozen_modules: tuple[str, ...] = ()

    def train(self, mode: bool = True) -> Method:
        super().train(mode)
        for name in self.frozen_modules:
            module = getattr(self, name, None)
            if module is not None:
                module.eval()
        return self

    @property
    def encoder(self) -> nn.Module:
        """The network evaluators use: the EMA teacher's backbone in self-distillation methods
        (DINO, iBOT, DINOv2); methods without a teacher override it."""
        return self.teacher.backbone

    def training_step(self, batch: dict[str, Any], step: int, sched: Mapping[str, float]) -> dict[str, torch.Tensor]:
        """Return {"loss": scalar tensor, **values to log}."""
        raise NotImplementedError

    def forward(self, batch: dict[str, Any], step: int, sched: Mapping[str, float]) -> dict[str, torch.Tensor]:
        return self.training_step(batch, step, sched)

    def before_optimizer_step(self, step: int, sched: Mapping[str, float]) -> None:
        """Gradients are ready (unscaled, clipped); e.g. drop the grads of a frozen layer."""

    def on_step_end(self, step: int, sched: Mapping[str, float]) -> None:
        """After the optimizer step: EMA teachers, momentum centers."""

    def param_groups(self) -> list[dict[str, Any]]:
        """Trainable parameters split for the optimizer; `wd_mult` / `lr_mult` scale the schedules.

        Default (DINO/MAE convention): no weight decay on biases and 1-D parameters (norms).
        """
        decay, no_decay = [], []
        for name, p in self.named_parameters():
            if not p.requires_grad:
                continue
            (no_decay if name.endswith(".bias") or p.ndim <= 1 else decay).append(p)
        return [
            {"params": decay, "wd_mult": 1.0, "lr_mult": 1.0, "name": "decay"},
            {"params": no_decay, "wd_mult": 0.0, "lr_mult": 1.0, "name": "no_decay"},
        ]


def make_ema_teacher(student: nn.Module) -> nn.Module:
    """An exact copy of `student` that gradients never reach, without stochastic depth (the
    official DINO/iBOT/DINOv2 teachers are built with drop_path_rate=0)."""
    teacher = copy.deepcopy(student)
    for m in teacher.modules():
        if hasattr(m, "drop_prob"):  # timm DropPath
            m.drop_prob = 0.0
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher


@torch.no_grad()
def ema_update(teacher: nn.Module, student: nn.Module, momentum: float) -> None:
    """teacher <- m * teacher + (1 - m) * student over parameters (buffers are not averaged,
    as in the official DINO/iBOT/DINOv2 code)."""
    t_params = [p for p in teacher.parameters()]
    s_params = [p.detach() for p in student.parameters()]
    torch._foreach_mul_(t_params, momentum)
    torch._foreach_add_(t_params, s_params, alpha=1.0 - momentum)
