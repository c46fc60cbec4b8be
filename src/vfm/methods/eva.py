"""EVA: masked image modelling with a CLIP teacher's features as targets.

Fang et al., "EVA: Exploring the Limits of Masked Visual Representation Learning at Scale", CVPR
2023 (baaivision/EVA, `EVA-01/eva/`); Fang et al., "EVA-02: A Visual Representation for Neon
Genesis", 2024 (`EVA-02/asuka/`).

The student ViT sees the image with ~40% of its patches, in blocks, replaced by a mask token; a
linear head (`lm_head`) maps its output tokens to the teacher's width, and the loss is the negative
cosine similarity to the frozen teacher's features of the same patches of the unmasked image, on
the masked positions only: `engine_for_pretraining.py` gathers `clip_features[bool_masked_pos]` and
`modeling_pretrain.py` predicts `lm_head(x[bool_masked_pos])`, in EVA-01 and EVA-02 alike. EVA-02
differs in the student (`backbone=eva02_base`: SwiGLU, 2-D RoPE, sub-LN), the teacher (EVA-CLIP)
and the optimizer. `loss_on: all` regresses every token instead (not in either paper; a variant
for a student much smaller than its teacher).

The teacher (`vfm.backbones.teacher.Teacher`) is any image encoder file: an OpenAI / open_clip /
EVA-CLIP weight file with its timm model name (`teacher_model`; its projection is kept, as the
papers' targets are `ln_post(x) @ proj`), a CLIP image tower trained here (`method=clip`), or any
other checkpoint of this project. `teacher_normalize: clip` feeds it CLIP-normalised images, as the
papers do; `dataset` feeds it the student's images (a teacher trained here, on that normalisation).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from torch import Tensor, nn

from vfm.backbones.teacher import Teacher
from vfm.data.batch import Batch
from vfm.losses.mim_losses import negative_cosine
from vfm.methods.base import Method, linear_head


class EVA(Method):
    """Args:
        backbone: the student ViT `Backbone` (given a mask token here).
        teacher: the teacher's weights (a pretrain run directory, encoder.safetensors, last.pt, or a
            timm/open_clip weight file together with `teacher_model`).
        teacher_model: timm model name for a foreign weight file (e.g. vit_large_patch14_clip_224).
        teacher_normalize: "clip" (the papers: the teacher sees CLIP's mean/std) or "dataset".
        data_mean, data_std: the dataset's normalisation (to undo it for "clip").
        loss_on: "masked" (EVA-01, EVA-02) or "all" (every token; not a paper setting).
    """

    needs_patch_tokens = True
    frozen_modules = ("teacher",)
    # EVA-01/02 `create_optimizer` skips the model's no_weight_decay() = {pos_embed, cls_token}
    token_weight_decay = False

    def __init__(self, backbone: nn.Module, *, teacher: str, teacher_model: str | None = None,
                 teacher_normalize: str = "clip", data_mean: Sequence[float] | None = None,
                 data_std: Sequence[float] | None = None, loss_on: str = "masked") -> None:
        super().__init__()
        if loss_on not in ("masked", "all"):
            raise ValueError(f"method.loss_on must be 'masked' or 'all', got {loss_on!r}")
        backbone.enable_mask_token(std=0.02)  # EVA-01: trunc_normal_(std=.02) cut at +-std
        self.backbone = backbone
        self.loss_on = loss_on
        self.teacher = Teacher(teacher, model_name=teacher_model, normalize=teacher_normalize,
                               data_mean=data_mean, data_std=data_std)
        if self.teacher.patch_size != backbone.patch_size:
            raise ValueError(
                f"teacher {teacher} has {self.teacher.patch_size} px patches but the student has {backbone.patch_size}: "
                f"their patch grids must match; set backbone.patch_size={self.teacher.patch_size}")
        # EVA's lm_head: one linear layer after the student's final norm, to the teacher's width
        self.head = linear_head(backbone.embed_dim, self.teacher.out_dim)

    @property
    def encoder(self) -> nn.Module:
        return self.backbone

    def training_step(self, batch: Batch, step: int, sched: Mapping[str, float]) -> dict[str, Tensor]:
        if "masks" not in batch:
            raise ValueError("EVA needs patch masks in the batch: configure method.masking")
        images, mask = batch["crops"][0], batch["masks"][0]
        target = self.teacher(images)
        if target.shape[1] != mask.shape[1]:
            raise ValueError(f"the teacher's patch grid has {target.shape[1]} tokens but the student's has {mask.shape[1]}")
        pred = self.head(self.backbone.forward_tokens(images, mask=mask)["patch"])
        loss = negative_cosine(pred, target, mask if self.loss_on == "masked" else None)
        return {"loss": loss, "mask_ratio": mask.float().mean()}
