"""Distillation of a frozen pretrained encoder into a smaller student.

Oquab et al., "DINOv2: Learning Robust Visual Features without Supervision", TMLR 2024, §5
("Distillation of pretrained features"): the DINOv2 training loop with "a larger model as a frozen
teacher", "a spare EMA of the student that we use as our final model", no masking and no stochastic
depth, and "the iBOT loss on the two global crops". facebookresearch/dinov2 does not release the
distillation loop; the losses are those of its `train/ssl_meta_arch.py` (`DINOLoss`,
`iBOTPatchLoss`, centering or Sinkhorn-Knopp) with the teacher's heads frozen.

Two objectives (`objective`):

- `dino_head` (the paper's): the student gets its own DINO head (and iBOT patch head), of the
  teacher's head architecture and prototype count, and learns the teacher head's centered, sharpened
  softmax: the DINO loss over multi-crops (teacher: global crops; student: all crops, never a view
  against itself) plus, when the teacher has a patch head (iBOT, DINOv2), the iBOT loss on every
  patch of the unmasked global crops:

      L = w_dino * L_dino + w_ibot * 1 / B * sum_b mean_i CE(P_t(b, i), P_s(b, i))

- `cosine`: the student regresses the teacher's features of the global crops, [CLS] and patch
  tokens, through one linear projection (identity when the widths agree):

      L = (1 - mean_b cos(W s_b, t_b)) + (1 - mean_{b, i} cos(W s_bi, t_bi))

  Any encoder works as the teacher here (an exported file or timm weights); local crops are unused.

The teacher is any checkpoint of this project (a run directory, its `checkpoints/last.pt` or
`encoder.safetensors`), or timm weights with `teacher_model`; the DINO-family heads come from a
`checkpoints/last.pt` (`vfm.methods.distill_teacher`). Its patch grid must match the student's.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vfm.backbones.loading import load_pretrained_encoder
from vfm.config import ConfigError
from vfm.data.batch import Batch
from vfm.data.collate import Collate
from vfm.heads.dino_head import DINOHead
from vfm.losses.dino_loss import DINOLoss
from vfm.losses.ibot_loss import iBOTPatchLoss, masked_patch_cross_entropy
from vfm.losses.mim_losses import negative_cosine
from vfm.losses.sinkhorn_knopp import sinkhorn_knopp
from vfm.methods.base import Method, ema_update, linear_head, make_ema_teacher
from vfm.methods.classifier import set_drop_path
from vfm.methods.dinov2 import DINOv2Tower
from vfm.methods.distill_teacher import TeacherHeads, load_teacher_heads

if TYPE_CHECKING:
    from vfm.data.transforms import MultiCropAugmentation

OBJECTIVES = ("dino_head", "cosine")


class Distill(Method):
    """Args:
        backbone: the student ViT `Backbone`.
        teacher: the teacher's weights (see the module docstring).
        teacher_model: timm model name for a foreign weight file.
        objective: "dino_head" or "cosine".
        centering: teacher probabilities by a momentum center ("centering") or "sinkhorn_knopp".
        sinkhorn_iterations: Sinkhorn-Knopp iterations.
        student_temp, center_momentum: DINO's tau_s and center momentum.
        dino_weight, ibot_weight: loss weights of the [CLS] and patch terms.
        ema_encoder: evaluate and export the student's EMA (the paper's final model), else the student.
        n_global_crops: leading global crops (the teacher's views).
        drop_path_rate: the student's stochastic depth, replacing `backbone.drop_path_rate` (the
            paper removes it: 0; None keeps the backbone's).
    """

    needs_patch_tokens = True
    frozen_modules = ("teacher",)

    def __init__(
        self,
        backbone: nn.Module,
        *,
        teacher: str,
        teacher_model: str | None = None,
        objective: str = "dino_head",
        # the teacher's targets and the student's temperature
        centering: str = "centering",
        sinkhorn_iterations: int = 3,
        student_temp: float = 0.1,
        center_momentum: float = 0.9,
        # loss weights (dino_head objective)
        dino_weight: float = 1.0,
        ibot_weight: float = 1.0,
        ema_encoder: bool = True,
        n_global_crops: int = 2,
        drop_path_rate: float | None = 0.0,
    ) -> None:
        super().__init__()
        if objective not in OBJECTIVES:
            raise ValueError(f"method.objective must be one of {OBJECTIVES}, got {objective!r}")
        if centering not in ("centering", "sinkhorn_knopp"):
            raise ValueError(f"method.centering must be 'centering' or 'sinkhorn_knopp', got {centering!r}")
        encoder = load_pretrained_encoder(teacher, model_name=teacher_model)
        _check_grids(encoder, backbone, teacher)
        if drop_path_rate is not None:
            set_drop_path(backbone, drop_path_rate)
        heads = load_teacher_heads(teacher, int(encoder.embed_dim)) if objective == "dino_head" else TeacherHeads()
        if objective == "dino_head" and heads.dino is None:
            raise ValueError(f"teacher {teacher} has no DINO head (it is not a DINO, iBOT or DINOv2 checkpoints/last.pt); "
                             "pass such a run directory or use method.objective=cosine")
        self.teacher = DINOv2Tower(encoder, heads.dino, heads.separate_patch)
        for p in self.teacher.parameters():
            p.requires_grad_(False)
        self.objective, self.n_global_crops = objective, n_global_crops
        self.distill_patches = heads.patch is not None
        self.student = DINOv2Tower(backbone, *_student_heads(heads, int(backbone.embed_dim)))
        self.projection = None
        if objective == "cosine" and int(backbone.embed_dim) != int(encoder.embed_dim):
            self.projection = linear_head(int(backbone.embed_dim), int(encoder.embed_dim))
        self.student_ema = make_ema_teacher(backbone) if ema_encoder else None
        if heads.dino is not None:
            self.dino_loss = DINOLoss(heads.out_dim, student_temp=student_temp, center_momentum=center_momentum)
        if self.distill_patches:
            self.ibot_loss = iBOTPatchLoss(heads.patch_out_dim, student_temp=student_temp, center_momentum=center_momentum)
        self.student_temp, self.centering, self.sinkhorn_iterations = student_temp, centering, sinkhorn_iterations
        self.dino_weight, self.ibot_weight = dino_weight, ibot_weight

    @property
    def encoder(self) -> nn.Module:
        return self.student_ema if self.student_ema is not None else self.student.backbone

    def build_collate(self, augment: MultiCropAugmentation, masking: Callable[..., Tensor] | None = None) -> Collate:
        """The multi-crop views; `dino_head` needs local crops: the student's views of the DINO
        loss are the crops besides the teacher's global ones."""
        if self.objective == "dino_head" and augment.n_local < 1:
            raise ConfigError(f"method.augment.n_local={augment.n_local}: method.objective=dino_head needs local crops "
                              "(the student's views in the DINO loss); set method.augment.n_local to 1 or more "
                              "(the paper: 8) or method.objective=cosine")
        return super().build_collate(augment, masking)

    def training_step(self, batch: Batch, step: int, sched: Mapping[str, float]) -> dict[str, Tensor]:
        crops: list[Tensor] = batch["crops"]
        globals_ = torch.cat(crops[: self.n_global_crops])
        with torch.no_grad():
            t = self.teacher.backbone.forward_tokens(globals_)
        s = self.student.backbone.forward_tokens(globals_)
        if self.objective == "cosine":
            return self._cosine(s, t)
        return self._dino_head(crops, s, t, sched)

    def _cosine(self, s: dict[str, Tensor], t: dict[str, Tensor]) -> dict[str, Tensor]:
        project = self.projection if self.projection is not None else nn.Identity()
        loss_cls = negative_cosine(project(s["global"]).unsqueeze(1), t["global"].unsqueeze(1))
        loss_patch = negative_cosine(project(s["patch"]), t["patch"])
        return {"loss": loss_cls + loss_patch, "loss_cls": loss_cls.detach(), "loss_patch": loss_patch.detach()}

    def _dino_head(self, crops: list[Tensor], s: dict[str, Tensor], t: dict[str, Tensor],
                   sched: Mapping[str, float]) -> dict[str, Tensor]:
        n_g = self.n_global_crops
        if len(crops) <= n_g:
            raise ValueError(f"distillation with method.objective=dino_head needs local crops besides the {n_g} global ones")
        temp = float(sched["teacher_temp"])
        with torch.no_grad():
            t_cls_p = self._teacher_probs(self.teacher.dino_head(t["global"]), self.dino_loss, temp)
        s_all = list(self.student.dino_head(s["global"]).chunk(n_g))
        s_all += list(self.student.dino_head(self.student.backbone(torch.cat(crops[n_g:]))).chunk(len(crops) - n_g))
        loss_dino = self.dino_loss.cross_entropy(s_all, list(t_cls_p.chunk(n_g)))
        out = {"loss_dino": loss_dino.detach(), "teacher_entropy": self.dino_loss.last_teacher_entropy}
        loss = self.dino_weight * loss_dino
        if self.distill_patches:
            n_images, n_patches = t["patch"].shape[:2]
            with torch.no_grad():  # every patch of the unmasked global crops: [n_g * B * N, K']
                t_patch = self.teacher.patch_head()(t["patch"].flatten(0, 1))
                t_patch_p = self._teacher_probs(t_patch, self.ibot_loss, float(sched.get("teacher_patch_temp", temp)))
            s_patch = self.student.patch_head()(s["patch"].flatten(0, 1))
            weights = s_patch.new_full((s_patch.shape[0],), 1.0 / n_patches)  # each image's patches average
            loss_ibot = masked_patch_cross_entropy(s_patch, t_patch_p, weights, self.student_temp, n_images=n_images)
            loss = loss + self.ibot_weight * loss_ibot
            out["loss_ibot"] = loss_ibot.detach()
        return {"loss": loss, **out}

    @torch.no_grad()
    def _teacher_probs(self, logits: Tensor, loss: DINOLoss | iBOTPatchLoss, temp: float) -> Tensor:
        """Teacher head outputs [M, K] -> probabilities: Sinkhorn-Knopp, or the softmax around the
        momentum center of `loss` (DINOLoss for [CLS], iBOTPatchLoss for patches), then updated."""
        if self.centering == "sinkhorn_knopp":
            return sinkhorn_knopp(logits, temp, self.sinkhorn_iterations)
        probs = F.softmax((logits.float() - loss.center.reshape(1, -1)) / temp, dim=-1)
        loss.update_center(logits if isinstance(loss, DINOLoss) else logits.unsqueeze(0))
        return probs

    def before_optimizer_step(self, step: int, sched: Mapping[str, float]) -> None:
        if sched.get("freeze_last_layer", 0.0) > 0:  # DINO's frozen last layer, on the student's heads
            for head in (self.student.dino_head, self.student.ibot_head):
                for p in head.last_layer_parameters() if head is not None else ():
                    p.grad = None

    def on_step_end(self, step: int, sched: Mapping[str, float]) -> None:
        if self.student_ema is not None:
            ema_update(self.student_ema, self.student.backbone, float(sched["ema_momentum"]))


def _check_grids(teacher: nn.Module, student: nn.Module, path: str) -> None:
    if not getattr(teacher, "has_patch_tokens", False):
        raise ValueError(f"teacher {path} has no patch tokens; distillation needs a ViT teacher")
    if teacher.patch_size != student.patch_size:
        raise ValueError(f"teacher {path} has {teacher.patch_size} px patches but the student has {student.patch_size}: "
                         f"their patch grids must match; set backbone.patch_size={teacher.patch_size}")


def _student_heads(heads: TeacherHeads, embed_dim: int) -> tuple[DINOHead | None, DINOHead | None]:
    """Fresh heads of the teacher's architecture on the student's width: (DINO head, separate
    patch head or None when shared or absent)."""
    if heads.dino is None:
        return None, None
    dino = DINOHead(embed_dim, heads.out_dim, **heads.head_kwargs)
    separate = DINOHead(embed_dim, heads.patch_out_dim, **heads.head_kwargs) if heads.separate_patch is not None else None
    return dino, separate
