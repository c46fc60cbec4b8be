"""Optimizer construction, the lr scaling rule and gradient clipping.

The base learning rate follows the linear scaling rule used by DINO and MAE,
`lr = blr * global_batch / 256` (Goyal et al. 2017), or DINOv2's square-root rule
`lr = blr * sqrt(global_batch / 1024)` (`scaling_rule: sqrt_wrt_1024`), unless an absolute `lr`
is given.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any

import torch

# Layer-wise lr decay lives next to the backbones, so that methods (DINOv2) use it too without
# importing the engine; it is part of the optimizer's vocabulary, hence available here.
from vfm.backbones.layer_decay import NO_WEIGHT_DECAY, layer_decay_param_groups
from vfm.engine.schedules import Cosine

__all__ = ["CLIP_MODES", "NO_WEIGHT_DECAY", "OptimSpec", "clip_gradients", "layer_decay_param_groups",
           "set_optimizer_values"]

CLIP_MODES = ("per_param", "global", "per_module")


class OptimSpec:
    """Optimizer and its schedules, as configured under `optim`.

    Args:
        name: "adamw" (DINO, MAE, iBOT, CLIP) or "sgd".
        blr: base lr per 256 images; the lr is `blr * global_batch / 256`.
        lr: absolute peak lr; overrides `blr` when set.
        min_lr: final lr of the cosine schedule.
        warmup_epochs: linear lr warmup from `warmup_lr`.
        warmup_lr: the lr of the first warmup step (0; I-JEPA starts at 2e-4, `start_lr`).
        weight_decay, weight_decay_end: cosine weight-decay schedule (DINO: 0.04 -> 0.4).
        betas, eps: AdamW; momentum: SGD.
        clip_grad: max gradient norm (None or 0 disables).
        clip_mode: "per_param" clips each parameter's gradient on its own (official DINO
            `clip_gradients`); "global" clips the norm of all gradients together (BEiT, EVA);
            "per_module" clips the norm of each of the method's `gradient_clip_groups` on its own
            (DINOv2 `train.py`: `clip_grad_norm_` on the student's backbone, DINO head and iBOT
            head in turn; "global" for methods with a single group).
        fused: use the fused AdamW kernel (None: on CUDA and CPU; False: foreach).
        lr_scaling: "linear" (`blr * batch / ref`, Goyal et al. 2017; DINO, MAE) or "sqrt"
            (`blr * sqrt(batch / ref)`, DINOv2's `sqrt_wrt_1024`).
        lr_reference_batch: ref above (256 for the linear rule, 1024 in DINOv2).
    """

    def __init__(
        self,
        name: str = "adamw",
        blr: float = 5e-4,
        lr: float | None = None,
        min_lr: float = 1e-6,
        warmup_epochs: float = 10.0,
        weight_decay: float = 0.04,
        weight_decay_end: float | None = None,
        betas: Sequence[float] = (0.9, 0.999),
        eps: float = 1e-8,
        momentum: float = 0.9,
        clip_grad: float | None = 3.0,
        clip_mode: str = "per_param",
        fused: bool | None = None,
        lr_scaling: str = "linear",
        lr_reference_batch: int = 256,
        warmup_lr: float = 0.0,
    ) -> None:
        if name not in ("adamw", "sgd"):
            raise ValueError(f"optim.name must be 'adamw' or 'sgd', got {name!r}")
        if clip_mode not in CLIP_MODES:
            raise ValueError(f"optim.clip_mode must be one of {list(CLIP_MODES)}, got {clip_mode!r}")
        self.name, self.blr, self.lr, self.min_lr = name, blr, lr, min_lr
        self.warmup_epochs, self.warmup_lr = warmup_epochs, warmup_lr
        self.weight_decay = weight_decay
        self.weight_decay_end = weight_decay if weight_decay_end is None else weight_decay_end
        self.betas, self.eps, self.momentum = tuple(betas), eps, momentum
        if lr_scaling not in ("linear", "sqrt"):
            raise ValueError(f"optim.lr_scaling must be 'linear' or 'sqrt', got {lr_scaling!r}")
        self.clip_grad, self.clip_mode, self.fused = clip_grad, clip_mode, fused
        self.lr_scaling, self.lr_reference_batch = lr_scaling, lr_reference_batch

    def peak_lr(self, global_batch: int) -> float:
        if self.lr is not None:
            return float(self.lr)
        ratio = global_batch / self.lr_reference_batch
        return self.blr * (math.sqrt(ratio) if self.lr_scaling == "sqrt" else ratio)

    def lr_rule(self, global_batch: int) -> str:
        """Human-readable statement of the lr actually used (printed and saved with the run)."""
        if self.lr is not None:
            return f"lr = {self.lr:.3g} (absolute, optim.lr)"
        ref, lr = self.lr_reference_batch, self.peak_lr(global_batch)
        if self.lr_scaling == "sqrt":
            return f"lr = blr * sqrt(batch / {ref}) = {self.blr:.3g} * sqrt({global_batch} / {ref}) = {lr:.4g}"
        return f"lr = blr * batch / {ref} = {self.blr:.3g} * {global_batch} / {ref} = {lr:.4g}"

    def lr_schedule(self, global_batch: int) -> Cosine:
        return Cosine(self.peak_lr(global_batch), self.min_lr, warmup_epochs=self.warmup_epochs,
                      warmup_start=self.warmup_lr)

    def wd_schedule(self) -> Cosine:
        return Cosine(self.weight_decay, self.weight_decay_end)

    def build(self, param_groups: list[dict[str, Any]], device_type: str) -> torch.optim.Optimizer:
        groups = [g for g in param_groups if len(g["params"]) > 0]
        if self.name == "sgd":
            return torch.optim.SGD(groups, lr=0.0, momentum=self.momentum, weight_decay=0.0)
        # fused AdamW: one kernel for all parameters, on CUDA and on the CPU alike (`make bench`,
        # ablation: optimizer.step() 3.3-3.8x faster than foreach on the CPU recipes)
        fused = self.fused if self.fused is not None else device_type in ("cuda", "cpu")
        return torch.optim.AdamW(
            groups, lr=0.0, betas=self.betas, eps=self.eps, weight_decay=0.0, fused=fused or None,
            foreach=None if fused else True,
        )


def set_optimizer_values(
    optimizer: torch.optim.Optimizer, lr: float, wd: float, last_layer_lr: float | None = None
) -> None:
    """Apply this step's scheduled lr and weight decay, scaled by each group's multipliers.

    Groups marked `is_last_layer` (DINOv2's prototype layers) train at `last_layer_lr` instead of
    `lr` when it is given: DINOv2 freezes them by a zero lr during the first epoch
    (`build_schedulers`' `last_layer_lr_schedule`), so AdamW's moments keep accumulating and,
    with the lr at 0, neither the step nor the decoupled weight decay moves them.
    """
    for g in optimizer.param_groups:
        base = last_layer_lr if (last_layer_lr is not None and g.get("is_last_layer", False)) else lr
        g["lr"] = base * g.get("lr_mult", 1.0)
        g["weight_decay"] = wd * g.get("wd_mult", 1.0)


def _is_dtensor(t: torch.Tensor) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


@torch.no_grad()
def clip_gradients(
    params: Iterable[torch.nn.Parameter], max_norm: float | None, mode: str,
    groups: Sequence[Iterable[torch.nn.Parameter]] | None = None,
) -> torch.Tensor:
    """Clip gradients and return the total gradient norm before clipping (for logging).

    mode "per_module": each of `groups` (default: `params` as one group) is clipped to `max_norm`
    on its own, as a global norm; the returned norm is that of all of them together.
    """
    if mode != "per_module":
        norms = [_clip(params, max_norm, mode)]
    else:
        norms = [_clip(g, max_norm, "global") for g in (groups if groups is not None else [params])]
    norms = [n for n in norms if n is not None]  # groups without gradients
    if not norms:
        return torch.zeros(())
    return norms[0] if len(norms) == 1 else torch.linalg.vector_norm(torch.stack(norms))


def _clip(params: Iterable[torch.nn.Parameter], max_norm: float | None, mode: str) -> torch.Tensor | None:
    """Clip one group of parameters ("global" or "per_param"); its norm, None without gradients."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return None
    group = None
    if _is_dtensor(grads[0]):
        # FSDP: each process holds a shard of every gradient. Per-parameter norms are the root of
        # the all-reduced sums of squares of the local shards; the scaling then acts on the shards.
        group = grads[0].device_mesh.get_group()
        grads = [g.to_local() for g in grads]
    norms = torch.stack(torch._foreach_norm(grads))
    if group is not None:
        norms = norms.square()
        torch.distributed.all_reduce(norms, group=group)
        norms = norms.sqrt()
    total = torch.linalg.vector_norm(norms)
    if not max_norm:
        return total
    if mode == "global":
        coef = (max_norm / (total + 1e-6)).clamp(max=1.0)
        torch._foreach_mul_(grads, coef)
    else:
        # Each parameter on its own, as DINO's utils.clip_gradients: scale by clip / (||g|| + 1e-6) if < 1.
        # The coefficients of all parameters in three kernels, not three per parameter: a ViT-B
        # has ~150 parameter tensors, and the per-parameter launches cost ~10% of a GPU step.
        coefs = (max_norm / (norms + 1e-6)).clamp(max=1.0)
        torch._foreach_mul_(grads, list(coefs.unbind(0)))
    return total
