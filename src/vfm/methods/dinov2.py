"""DINOv2: DINO [CLS] self-distillation + iBOT masked patch distillation + KoLeo.

Oquab et al., "DINOv2: Learning Robust Visual Features without Supervision", TMLR 2024; official
code facebookresearch/dinov2 (`train/ssl_meta_arch.py`, `loss/`, `configs/ssl_default_config.yaml`).

    L = w_dino * L_dino + w_ibot * L_ibot + w_koleo * sum_{global views} KoLeo(student [CLS])

- L_dino: DINO loss, teacher [CLS] of the global views vs student [CLS] of all other views;
- L_ibot: cross-entropy on the masked patches only (gathered), each weighted 1 / #masked of its
  image, averaged over images; [CLS] and patches have separate heads (`separate_heads`);
- teacher probabilities: softmax with a momentum center (`centering="centering"`, DINOv2's
  default config) or Sinkhorn-Knopp (`"sinkhorn_knopp"`, its large-model configs), both
  synchronised across processes;
- KoLeo on the student's backbone [CLS] features of each global view (weight 0.1).
Stochastic depth is the same in every student block (`drop_path_uniform`, 0.3 in the default
config); LayerScale and register tokens are timm keys of the backbone
(`+backbone.model_kwargs={init_values: 1e-5, reg_tokens: 4}`; experiment=dinov2_vit_large_imagenet).
`param_groups` holds the layer-wise lr decay, the patch-embedding lr multiplier and the heads'
last layers (`is_last_layer`: the engine freezes them by a zero lr while `freeze_last_layer` is
on, as DINOv2's `last_layer_lr_schedule`; their gradients still reach AdamW's moments);
`gradient_clip_groups` the backbone and the heads, clipped one by one (`optim.clip_mode=per_module`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from vfm.backbones.layer_decay import layer_decay_param_groups
from vfm.data.batch import Batch
from vfm.heads.dino_head import DINOHead
from vfm.losses.dino_loss import DINOLoss
from vfm.losses.ibot_loss import iBOTPatchLoss, masked_patch_cross_entropy
from vfm.losses.koleo import KoLeoLoss
from vfm.losses.sinkhorn_knopp import sinkhorn_knopp
from vfm.methods.base import Method, ema_update, make_ema_teacher
from vfm.methods.classifier import set_drop_path


class DINOv2Tower(nn.Module):
    def __init__(self, backbone: nn.Module, dino_head: nn.Module, ibot_head: nn.Module | None) -> None:
        super().__init__()
        self.backbone = backbone
        self.dino_head = dino_head
        self.ibot_head = ibot_head  # None: shared with dino_head

    def patch_head(self) -> nn.Module:
        return self.ibot_head if self.ibot_head is not None else self.dino_head


class DINOv2(Method):
    """DINOv2 method.

    Args:
        backbone: a ViT `vfm.backbones.Backbone`.
        out_dim, patch_out_dim: prototypes of the [CLS] and patch heads.
        separate_heads: a separate head for patch tokens (the ViT-L/g configs, with
            Sinkhorn-Knopp and 131072 prototypes); False (the default config): one shared head.
        hidden_dim, bottleneck_dim, head_layers, use_bn_in_head: DINO-style heads.
        norm_last_layer: freeze the weight-norm gain of the heads' last layer at 1 (DINO). DINOv2's
            heads fill the gain with 1 but leave it trainable, i.e. False.
        student_temp, center_momentum: as DINO.
        centering: "centering" (momentum center) or "sinkhorn_knopp".
        sinkhorn_iterations: Sinkhorn-Knopp iterations (3).
        dino_weight, ibot_weight, koleo_weight: loss weights (1, 1, 0.1).
        layerwise_decay: lr multiplier decay per block from the top (0.9; 1 disables).
        patch_embed_lr_mult: extra lr multiplier of the patch embedding (0.2).
        n_global_crops: leading global crops (masked for the student, seen by the teacher).
        drop_path_rate: the student's stochastic depth (None: the backbone's `drop_path_rate`).
        drop_path_uniform: the same rate in every block (DINOv2); False: timm's linear ramp.
    """

    needs_patch_tokens = True

    def __init__(
        self,
        backbone: nn.Module,
        *,
        out_dim: int = 65536,
        patch_out_dim: int = 65536,
        separate_heads: bool = False,
        hidden_dim: int = 2048,
        bottleneck_dim: int = 256,
        head_layers: int = 3,
        use_bn_in_head: bool = False,
        norm_last_layer: bool = False,
        student_temp: float = 0.1,
        center_momentum: float = 0.9,
        centering: str = "centering",
        sinkhorn_iterations: int = 3,
        dino_weight: float = 1.0,
        ibot_weight: float = 1.0,
        koleo_weight: float = 0.1,
        layerwise_decay: float = 0.9,
        patch_embed_lr_mult: float = 0.2,
        n_global_crops: int = 2,
        drop_path_rate: float | None = None,
        drop_path_uniform: bool = True,
    ) -> None:
        super().__init__()
        if centering not in ("centering", "sinkhorn_knopp"):
            raise ValueError(f"method.centering must be 'centering' or 'sinkhorn_knopp', got {centering!r}")
        backbone.enable_mask_token()
        if drop_path_rate is None:
            drop_path_rate = float(backbone.create_kwargs.get("drop_path_rate", 0.0))
        set_drop_path(backbone, drop_path_rate, uniform=drop_path_uniform)  # before the teacher copy: it has none
        embed_dim = int(backbone.embed_dim)

        def make_head(k: int) -> DINOHead:
            return DINOHead(embed_dim, k, hidden_dim=hidden_dim, bottleneck_dim=bottleneck_dim, nlayers=head_layers,
                            use_bn=use_bn_in_head, norm_last_layer=norm_last_layer)

        self.student = DINOv2Tower(backbone, make_head(out_dim), make_head(patch_out_dim) if separate_heads else None)
        self.teacher = make_ema_teacher(self.student)
        patch_dim = patch_out_dim if separate_heads else out_dim
        self.dino_loss = DINOLoss(out_dim, student_temp=student_temp, center_momentum=center_momentum)
        self.ibot_loss = iBOTPatchLoss(patch_dim, student_temp=student_temp, center_momentum=center_momentum)
        self.koleo = KoLeoLoss()
        self.centering, self.sinkhorn_iterations = centering, sinkhorn_iterations
        self.student_temp = student_temp
        self.dino_weight, self.ibot_weight, self.koleo_weight = dino_weight, ibot_weight, koleo_weight
        self.layerwise_decay, self.patch_embed_lr_mult = layerwise_decay, patch_embed_lr_mult
        self.n_global_crops = n_global_crops

    @torch.no_grad()
    def _teacher_probs(self, cls_logits: torch.Tensor, patch_logits: torch.Tensor, temp: float, patch_temp: float):
        if self.centering == "sinkhorn_knopp":
            return (sinkhorn_knopp(cls_logits, temp, self.sinkhorn_iterations),
                    sinkhorn_knopp(patch_logits, patch_temp, self.sinkhorn_iterations))
        cls_p = F.softmax((cls_logits.float() - self.dino_loss.center) / temp, dim=-1)
        patch_p = F.softmax((patch_logits.float() - self.ibot_loss.center.reshape(1, -1)) / patch_temp, dim=-1)
        self.dino_loss.update_center(cls_logits)
        self.ibot_loss.update_center(patch_logits.unsqueeze(0))
        return cls_p, patch_p

    def training_step(self, batch: Batch, step: int, sched: Mapping[str, float]) -> dict[str, torch.Tensor]:
        crops: list[torch.Tensor] = batch["crops"]
        if "masks" not in batch:
            raise ValueError("DINOv2 needs patch masks in the batch: configure method.masking")
        n_g = self.n_global_crops
        globals_ = torch.cat(crops[:n_g])
        masks = torch.cat(batch["masks"])  # [n_g * B, N]
        n_images = masks.shape[0]
        # each masked token weighs 1 / (#masked in its image): every image counts the same
        weights = (1.0 / masks.sum(-1).clamp(min=1.0)).unsqueeze(-1).expand_as(masks)[masks]

        with torch.no_grad():
            t = self.teacher.backbone.forward_tokens(globals_)
            t_cls = self.teacher.dino_head(t["global"])
            t_patch = self.teacher.patch_head()(t["patch"][masks])  # [M, K'] masked positions only
            t_cls_p, t_patch_p = self._teacher_probs(
                t_cls, t_patch, float(sched["teacher_temp"]), float(sched.get("teacher_patch_temp", sched["teacher_temp"]))
            )

        s = self.student.backbone.forward_tokens(globals_, mask=masks)
        s_cls = self.student.dino_head(s["global"])
        s_all = list(s_cls.chunk(n_g))
        if len(crops) > n_g:
            local = self.student.dino_head(self.student.backbone(torch.cat(crops[n_g:])))
            s_all += list(local.chunk(len(crops) - n_g))
        loss_dino = self.dino_loss.cross_entropy(s_all, list(t_cls_p.chunk(n_g)))
        s_patch = self.student.patch_head()(s["patch"][masks])
        loss_ibot = masked_patch_cross_entropy(s_patch, t_patch_p, weights, self.student_temp, n_images=n_images)
        loss_koleo = sum(self.koleo(c) for c in s["global"].chunk(n_g))
        loss = self.dino_weight * loss_dino + self.ibot_weight * loss_ibot + self.koleo_weight * loss_koleo
        return {"loss": loss, "loss_dino": loss_dino.detach(), "loss_ibot": loss_ibot.detach(),
                "loss_koleo": torch.as_tensor(loss_koleo).detach(), "teacher_entropy": self.dino_loss.last_teacher_entropy}

    def on_step_end(self, step: int, sched: Mapping[str, float]) -> None:
        ema_update(self.teacher, self.student, float(sched["teacher_momentum"]))

    def gradient_clip_groups(self) -> list[list[nn.Parameter]]:
        """The student's backbone, DINO head and iBOT head (when separate): DINOv2 clips each
        submodule's gradient norm on its own (`train.py`, `clip_grad_norm_` per student module)."""
        modules = [self.student.backbone, self.student.dino_head, self.student.ibot_head]
        return [[p for p in m.parameters() if p.requires_grad] for m in modules if m is not None]

    def param_groups(self) -> list[dict[str, Any]]:
        """One group per (lr multiplier, weight-decay multiplier, last layer): layer-wise lr decay
        over the backbone blocks (DINOv2 `get_vit_lr_decay_rate`: embeddings and mask token layer
        0, block `i` layer `i + 1`, final norm and heads at the full lr), the patch-embedding
        multiplier on top, no weight decay on biases, norms and 1-D parameters (the position
        embedding and tokens decay, as in `get_params_groups_with_decay`), and the heads' last
        layers marked `is_last_layer`."""
        mults = {
            id(p): (g["lr_mult"], g["wd_mult"])
            for g in layer_decay_param_groups(self.student, layer_decay=self.layerwise_decay, no_weight_decay=("*norm*",))
            for p in g["params"]
        }
        # regrouped by multiplier value, in parameter order: the order the optimizer (and the
        # global gradient norm) sees the parameters in
        groups: dict[tuple[float, float, bool], list[nn.Parameter]] = {}
        for name, p in self.student.named_parameters():
            if not p.requires_grad:
                continue
            lr_mult, wd_mult = mults[id(p)]
            if ".patch_embed." in name:
                lr_mult *= self.patch_embed_lr_mult
            groups.setdefault((lr_mult, wd_mult, ".last_layer_" in name), []).append(p)
        return [{"params": ps, "lr_mult": lr, "wd_mult": wd, "is_last_layer": last,
                 "name": f"lr{lr:.3g}_wd{wd:g}" + ("_last_layer" if last else "")}
                for (lr, wd, last), ps in sorted(groups.items())]
