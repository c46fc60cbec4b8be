"""The one small interface every pretraining method implements (DESIGN: "at most one small base").

The engine calls, per optimisation step: `forward(batch, step, sched)` (= `training_step`, routed
through `forward` so DDP sees the call), then backward, `before_optimizer_step`, the optimizer
step, and `on_step_end` (EMA teachers, centers). `sched` holds this step's value of every schedule
named in the method's config (`method.schedules`), precomputed by the engine.

Everything else a method may offer is a hook declared here with a no-op default, so the entry
points call it on every method and never ask `hasattr`:

- `build_collate(augment, masking)`: the collate that builds its batches (default: multi-crop views
  plus masks when `masking` is set; CLIP tokenizes captions, supervised training mixes labels);
- `export_artifacts(run_dir)`: files it writes next to the encoder at the end (a tokenizer);
- `visualizations(images, ...)`: image grids of what it predicts (MAE's reconstructions);
- `report(images)`: metrics measured on validation images at the end (codebook usage);
- `text_model`: the image-text model zero-shot evaluators use (CLIP itself), None without one;
- `needs_captions` / `needs_patch_tokens`: what config validation checks before building it.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import Tensor, nn

from vfm.data.batch import Batch
from vfm.data.collate import Collate, MultiCropCollate

if TYPE_CHECKING:
    from vfm.data.transforms import MultiCropAugmentation


class Method(nn.Module):
    #: True for methods that consume patch tokens (iBOT, MAE, ...); validated before training
    needs_patch_tokens: ClassVar[bool] = False
    #: True for methods that train on image-caption pairs (CLIP); validated against the dataset
    needs_captions: ClassVar[bool] = False
    #: how many validation images `report` measures at the end (0: it reports nothing, none are read)
    report_images: ClassVar[int] = 0
    #: attributes holding frozen networks (EVA's teacher, BEiT's tokenizer): kept in eval mode
    #: (no dropout, drop path or BatchNorm updates) whatever mode the method is in
    frozen_modules: tuple[str, ...] = ()
    #: whether the backbone's position embedding and [CLS] / register tokens (timm's
    #: `no_weight_decay()` names) get weight decay like any other weight: yes in the official DINO,
    #: iBOT and DINOv2 (`get_params_groups`: only biases and 1-D / norm parameters are exempt) and
    #: MAE pretraining (timm 0.3.2 `add_weight_decay` without a skip list); no in DeiT and BEiT
    #: (timm's `create_optimizer` skips `model.no_weight_decay()`), which set it to False
    token_weight_decay: ClassVar[bool] = True

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

    def training_step(self, batch: Batch, step: int, sched: Mapping[str, float]) -> dict[str, torch.Tensor]:
        """Return {"loss": scalar tensor, **values to log}."""
        raise NotImplementedError

    def forward(self, batch: Batch, step: int, sched: Mapping[str, float]) -> dict[str, torch.Tensor]:
        return self.training_step(batch, step, sched)

    def before_optimizer_step(self, step: int, sched: Mapping[str, float]) -> None:
        """Gradients are ready (unscaled, clipped); e.g. drop the grads of a frozen layer."""

    def on_step_end(self, step: int, sched: Mapping[str, float]) -> None:
        """After the optimizer step: EMA teachers, momentum centers."""

    def build_collate(self, augment: MultiCropAugmentation, masking: Callable[..., Tensor] | None = None) -> Collate:
        """The collate that turns `(image, label, seed)` samples into this method's `Batch`.

        Default: `augment`'s views of each image (`crops`) and, when `masking` is given, one patch
        mask per global view on the encoder's patch grid (`masks`). Methods with another batch
        format (captions, soft labels) override it.
        """
        return MultiCropCollate(augment, masking=masking, patch_size=self.encoder.patch_size)

    def export_artifacts(self, run_dir: Path) -> list[Path]:
        """Write the files other runs read besides the encoder (e.g. BEiT's tokenizer) into
        `run_dir` and return their paths; the encoder itself is exported by the entry point."""
        return []

    def visualizations(
        self, images: Tensor, *, mean: Sequence[float], std: Sequence[float],
        masking: Callable[..., Tensor] | None = None,
    ) -> dict[str, Tensor]:
        """{name: float [3, H', W'] grid in [0, 1]} of what the method predicts for `images`
        (uint8 [n, C, H, W], the dataset's `mean`/`std` normalise them), written next to the
        attention maps at every evaluation. Default: none."""
        return {}

    def report(self, images: Tensor) -> dict[str, float]:
        """Metrics of the trained method itself on the first `report_images` validation images
        (normalised [M, C, H, W]), added to the final metrics (e.g. a tokenizer's codebook
        usage). Default: none."""
        return {}

    @property
    def text_model(self) -> nn.Module | None:
        """The image-text model zero-shot evaluators use (a module with `encode_text(list[str])`
        and `project_image(features)`, see `vfm.evaluators.zero_shot.TextModel`); None for
        image-only methods."""
        return None

    def param_groups(self) -> list[dict[str, Any]]:
        """Trainable parameters split for the optimizer; `wd_mult` / `lr_mult` scale the schedules.

        Default (DINO / MAE `get_params_groups`): no weight decay on biases and 1-D parameters
        (norms); with `token_weight_decay` False (DeiT, BEiT) none on the timm models'
        `no_weight_decay()` parameters either (position embedding, [CLS], register tokens).
        """
        skip = set() if self.token_weight_decay else timm_no_weight_decay_names(self)
        decay, no_decay = [], []
        for name, p in self.named_parameters():
            if not p.requires_grad:
                continue
            (no_decay if name.endswith(".bias") or p.ndim <= 1 or name in skip else decay).append(p)
        return [
            {"params": decay, "wd_mult": 1.0, "lr_mult": 1.0, "name": "decay"},
            {"params": no_decay, "wd_mult": 0.0, "lr_mult": 1.0, "name": "no_decay"},
        ]

    def gradient_clip_groups(self) -> list[list[nn.Parameter]]:
        """The parameter groups `optim.clip_mode=per_module` clips one by one (each to
        `optim.clip_grad`, as a global norm). Default: all trainable parameters, one group."""
        return [[p for p in self.parameters() if p.requires_grad]]


def timm_no_weight_decay_names(model: nn.Module) -> set[str]:
    """Full names of the parameters every timm model inside `model` lists in `no_weight_decay()`
    (a ViT's `pos_embed`, `cls_token`, `reg_token`, `dist_token`)."""
    names = set()
    for prefix, module in model.named_modules():
        if callable(getattr(module, "no_weight_decay", None)):
            names |= {f"{prefix}.{n}" if prefix else n for n in module.no_weight_decay()}
    return names



def linear_head(in_dim: int, out_dim: int) -> nn.Linear:
    """A linear prediction head initialised as in BEiT / DeiT / EVA: weights from a truncated
    normal with std 0.02, zero bias."""
    head = nn.Linear(in_dim, out_dim)
    nn.init.trunc_normal_(head.weight, std=0.02)
    nn.init.zeros_(head.bias)
    return head


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
