"""Per-iteration schedules, precomputed once from the config (DINO `utils.cosine_scheduler`,
DINOv2 `build_schedulers`): the training loop indexes a tensor with the global step, so a
resumed run reads exactly the values an uninterrupted run would have read.

Each class is a small spec that Hydra instantiates from YAML; `build(steps_per_epoch, epochs)`
returns a float64 tensor with one value per optimisation step.
"""

from __future__ import annotations

import math

import torch


class Schedule:
    def build(self, steps_per_epoch: int, epochs: int) -> torch.Tensor:  # pragma: no cover - interface
        raise NotImplementedError


class Constant(Schedule):
    """The same value at every step."""

    def __init__(self, value: float) -> None:
        self.value = float(value)

    def build(self, steps_per_epoch: int, epochs: int) -> torch.Tensor:
        return torch.full((steps_per_epoch * epochs,), self.value, dtype=torch.float64)


class Cosine(Schedule):
    """Linear warmup from `warmup_start` to `base` over `warmup_epochs`, then a half-cosine from
    `base` to `final` (DINO's `cosine_scheduler`; used for lr, weight decay and EMA momentum)."""

    def __init__(self, base: float, final: float, warmup_epochs: float = 0.0, warmup_start: float = 0.0) -> None:
        if warmup_epochs < 0:
            raise ValueError(f"warmup_epochs must be >= 0, got {warmup_epochs}")
        self.base, self.final = float(base), float(final)
        self.warmup_epochs, self.warmup_start = float(warmup_epochs), float(warmup_start)

    def build(self, steps_per_epoch: int, epochs: int) -> torch.Tensor:
        total = steps_per_epoch * epochs
        warm = min(int(round(self.warmup_epochs * steps_per_epoch)), total)
        warmup = torch.linspace(self.warmup_start, self.base, warm, dtype=torch.float64) if warm else torch.empty(0)
        rest = total - warm
        t = torch.arange(rest, dtype=torch.float64)
        cos = self.final + 0.5 * (self.base - self.final) * (1 + torch.cos(math.pi * t / max(rest, 1)))
        return torch.cat([warmup.double(), cos])


class WarmupConstant(Schedule):
    """Linear ramp from `start` to `value` over `warmup_epochs`, then constant (DINO's teacher
    temperature warmup, done per iteration as in DINOv2 rather than per epoch)."""

    def __init__(self, start: float, value: float, warmup_epochs: float = 0.0) -> None:
        self.start, self.value, self.warmup_epochs = float(start), float(value), float(warmup_epochs)

    def build(self, steps_per_epoch: int, epochs: int) -> torch.Tensor:
        total = steps_per_epoch * epochs
        warm = min(int(round(self.warmup_epochs * steps_per_epoch)), total)
        ramp = torch.linspace(self.start, self.value, warm, dtype=torch.float64) if warm else torch.empty(0)
        return torch.cat([ramp.double(), torch.full((total - warm,), self.value, dtype=torch.float64)])


class StepUntil(Schedule):
    """`before` for the first `epochs` epochs, `after` from then on (e.g. DINO freezes the head's
    last layer during the first epoch: `StepUntil(before=1, after=0, epochs=1)`)."""

    def __init__(self, before: float, after: float, epochs: float) -> None:
        self.before, self.after, self.epochs = float(before), float(after), float(epochs)

    def build(self, steps_per_epoch: int, epochs: int) -> torch.Tensor:
        total = steps_per_epoch * epochs
        n = min(int(round(self.epochs * steps_per_epoch)), total)
        out = torch.full((total,), self.after, dtype=torch.float64)
        out[:n] = self.before
        return out


class Linear(Schedule):
    """From `base` towards `final` in equal steps, base + i * (final - base) / total at step i: the
    last step is one increment short of `final` (I-JEPA's EMA momentum 0.996 -> 1,
    facebookresearch/ijepa `src/train.py` `momentum_scheduler` with `ipe_scale` 1)."""

    def __init__(self, base: float, final: float) -> None:
        self.base, self.final = float(base), float(final)

    def build(self, steps_per_epoch: int, epochs: int) -> torch.Tensor:
        total = steps_per_epoch * epochs
        return self.base + torch.arange(total, dtype=torch.float64) * ((self.final - self.base) / max(total, 1))
