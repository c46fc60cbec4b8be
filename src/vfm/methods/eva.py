"""EVA: masked image modelling with a CLIP teacher's features as targets.

Fang et al., "EVA: Exploring the Limits of Masked Visual Representation Learning at Scale", CVPR
2023 (baaivision/EVA, `EVA-01/eva/`); EVA-02 (Fang et al. 2024, `EVA-02/asuka/`).

The student ViT sees the image with ~40% of its patches, in blocks, replaced by a mask token; a
linear head maps its output tokens to the teacher's width, and the loss is the negative cosine
similarity to the frozen teacher's patch features of the unmasked image, on the masked tokens
(EVA-01, `loss_on: masked`) or on all tokens (the EVA-02 variant, `method=eva02`). The teacher is
any image encoder file: a CLIP image tower trained here (`method=clip`), any other checkpoint of
this project, or an open_clip / timm weight file with its timm model name (`teacher_model`).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor, nn

from vfm.backbones.loading import load_pretrained_encoder
from vfm.data.batch import Batch
from vfm.losses.mim_losses import negative_cosine
from vfm.methods.base import Method, linear_head


class EVA(Method):
    """Args:
        backbone: the student ViT `Backbone` (given a mask token here).
        teacher: the teacher's weights (a pretrain run directory, encoder.safetensors, last.pt, or a
            timm/open_clip weight file together with `teacher_model`).
        teacher_model: timm model name for a foreign weight file (e.g. vit_base_patch16_clip_224).
        loss_on: "masked" (EVA-01) or "all" (EVA-02 variant).
    """

    needs_patch_tokens = True
    frozen_modules = ("teacher",)

    def __init__(self, backbone: nn.Module, *, teacher: str, teacher_model: str | None = None,
                 loss_on: str = "masked") -> None:
        super().__init__()
        if loss_on not in ("masked", "all"):
            raise ValueError(f"method.loss_on must be 'masked' or 'all', got {loss_on!r}")
        backbone.enable_mask_token()
        self.backbone = backbone
        self.loss_on = loss_on
        self.teacher = load_pretrained_encoder(teacher, model_name=teacher_model)
        if not getattr(self.teacher, "has_patch_tokens", False):
            raise ValueError(f"teacher {teacher} ({self.teacher.name}) has no patch tokens; EVA needs a ViT teacher")
        if self.teacher.patch_size != backbone.patch_size:
            raise ValueError(
                f"teacher {teacher} has {self.teacher.patch_size} px patches but the student has {backbone.patch_size}: "
                f"their patch grids must match; set backbone.patch_size={self.teacher.patch_size}")
        for p in self.teacher.parameters():
            p.requires_grad_(False)
        # EVA-01's regression head: one linear layer after the student's final norm
        self.head = linear_head(backbone.embed_dim, self.teacher.embed_dim)

    @property
    def encoder(self) -> nn.Module:
        return self.backbone

    def training_step(self, batch: Batch, step: int, sched: Mapping[str, float]) -> dict[str, Tensor]:
        if "masks" not in batch:
            raise ValueError("EVA needs patch masks in the batch: configure method.masking")
        images, mask = batch["crops"][0], batch["masks"][0]
        with torch.no_grad():
            target = self.teacher.forward_tokens(images)["patch"]
        if target.shape[1] != mask.shape[1]:
            raise ValueError(f"the teacher's patch grid has {target.shape[1]} tokens but the student's has {mask.shape[1]}")
        pred = self.head(self.backbone.forward_tokens(images, mask=mask)["patch"])
        loss = negative_cosine(pred, target, mask if self.loss_on == "masked" else None)
        return {"loss": loss, "mask_ratio": mask.float().mean()}
