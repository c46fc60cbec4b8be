"""I-JEPA: a joint-embedding predictive architecture.

Assran et al., "Self-Supervised Learning from Images with a Joint-Embedding Predictive
Architecture", CVPR 2023; official code facebookresearch/ijepa (`src/train.py`, `src/helper.py`,
`src/models/vision_transformer.py`, `src/masks/multiblock.py`).

From a single view of each image (a random resized crop, no other augmentation), a context
encoder sees one large block of patches with the target blocks cut out of it (drawn in the data
pipeline by `vfm.data.multiblock.MultiBlockMaskGenerator`) and encodes only those patches; a narrow
ViT predictor (`vfm.heads.predictor.JEPAPredictor`) receives the encoded context plus a mask token
at every position of one target block and predicts the representation there. The targets are the
patch tokens of the whole image under a target encoder, an exponential moving average of the
context encoder (momentum 0.996 -> 1, linear), layer-normalised without affine parameters; the loss
is smooth L1 (`vfm.losses.ijepa_loss`). The target encoder is the encoder evaluators use; its global
feature is the average of its output patch tokens (the paper's evaluation protocol).

Stages: `forward_target` -> `forward_context` -> `forward_loss`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from vfm.config import ConfigError
from vfm.data.batch import Batch
from vfm.data.multiblock import MultiBlockCollate, MultiBlockMaskGenerator
from vfm.heads.predictor import JEPAPredictor
from vfm.losses.ijepa_loss import IJEPALoss, normalize_targets
from vfm.methods.base import Method, ema_update, make_ema_teacher

if TYPE_CHECKING:
    from vfm.data.transforms import MultiCropAugmentation


def gather_patches(tokens: Tensor, ids: Tensor) -> Tensor:
    """tokens [B, N, D], ids int64 [n, B, K] -> [n * B, K, D], block i of image b at row i * B + b
    (the official `apply_masks`)."""
    n, batch, k = ids.shape
    rows = torch.arange(batch, device=tokens.device).view(1, batch, 1)
    return tokens[rows, ids].reshape(n * batch, k, tokens.shape[-1])


def use_average_pooling(backbone: nn.Module) -> None:
    """Make the backbone's global feature the mean of its final-normed patch tokens (I-JEPA's
    evaluation feature) and record it in the timm arguments its exports are rebuilt with."""
    model = backbone.model
    if not isinstance(model.fc_norm, nn.Identity):
        raise ValueError("I-JEPA pools the final-normed patch tokens: build the backbone with "
                         "backbone.model_kwargs.fc_norm=false")
    model.global_pool = "avg"
    backbone.create_kwargs.update(global_pool="avg", fc_norm=False)


class IJEPA(Method):
    """I-JEPA method; the target encoder (EMA of the context encoder) is the encoder evaluators use.

    Args:
        backbone: a ViT `vfm.backbones.Backbone`, the context encoder (no [CLS] token in the
            official architecture: `backbone.model_kwargs.class_token=false`, set by method=ijepa).
        predictor_dim, predictor_depth: the predictor's width and depth (384 / 12 for ViT-H/14).
        predictor_heads: its attention heads; None: the encoder's head count (official).
        mlp_ratio, predictor_drop_path: of the predictor's blocks (4, 0).
        loss: "smooth_l1" (the official code) or "l2" (the paper's formula).
        fixed_pos_embed: the encoder's position embedding is the fixed 2-D sin-cos table (official).
        avg_pool: the encoder's global feature is the mean of its patch tokens (the paper's
            evaluation); False keeps the backbone's own pooling.
        init: "ijepa" starts the patch embedding as the official ViT (truncated normal, std 0.02,
            zero bias; timm's other initialisation already matches `init_model`'s); "timm" keeps
            timm's (PyTorch's default for the patch convolution).
    """

    needs_patch_tokens = True

    def __init__(
        self,
        backbone: nn.Module,
        *,
        predictor_dim: int = 384,
        predictor_depth: int = 12,
        predictor_heads: int | None = None,
        mlp_ratio: float = 4.0,
        predictor_drop_path: float = 0.0,
        loss: str = "smooth_l1",
        fixed_pos_embed: bool = True,
        avg_pool: bool = True,
        init: str = "ijepa",
    ) -> None:
        super().__init__()
        if init not in ("ijepa", "timm"):
            raise ValueError(f"init must be 'ijepa' or 'timm', got {init!r}")
        if init == "ijepa":
            proj = backbone.model.patch_embed.proj
            nn.init.trunc_normal_(proj.weight, std=0.02)
            if proj.bias is not None:
                nn.init.zeros_(proj.bias)
        if fixed_pos_embed:
            backbone.use_fixed_sincos_pos_embed()
        if avg_pool:
            use_average_pooling(backbone)
        self.backbone = backbone
        self.target_encoder = make_ema_teacher(backbone)
        heads = predictor_heads or int(backbone.model.blocks[0].attn.num_heads)
        self.predictor = JEPAPredictor(
            backbone.embed_dim, tuple(backbone.model.patch_embed.grid_size), predictor_dim=predictor_dim,
            depth=predictor_depth, num_heads=heads, mlp_ratio=mlp_ratio, drop_path_rate=predictor_drop_path,
            attn_impl=getattr(backbone, "attn_impl", "auto"),
        )
        self.loss_fn = IJEPALoss(loss)

    @property
    def encoder(self) -> nn.Module:
        return self.target_encoder

    def build_collate(self, augment: MultiCropAugmentation, masking: Callable[..., Tensor] | None = None) -> MultiBlockCollate:
        if not isinstance(masking, MultiBlockMaskGenerator):
            raise ConfigError("I-JEPA needs multi-block masks: method.masking._target_=vfm.data.multiblock.MultiBlockMaskGenerator")
        grid = augment.global_crop_size // int(self.backbone.patch_size)
        if (grid, grid) != self.predictor.grid_size:
            raise ConfigError(f"I-JEPA predicts on the backbone's {self.predictor.grid_size} patch grid but the view "
                              f"method.augment.global_crop_size={augment.global_crop_size} gives {grid}x{grid}; "
                              "set it to dataset.img_size")
        try:
            return MultiBlockCollate(augment, masking, int(self.backbone.patch_size))
        except ValueError as e:
            raise ConfigError(f"method.masking: {e}") from e

    @torch.no_grad()
    def forward_target(self, images: Tensor, target_ids: Tensor, n_contexts: int) -> Tensor:
        """The normalised target representations [n_tgt * n_ctx * B, K_tgt, D], in the predictor's order."""
        h = normalize_targets(self.target_encoder.forward_tokens(images)["patch"])
        n_tgt, batch, k = target_ids.shape
        h = gather_patches(h, target_ids).view(n_tgt, 1, batch, k, -1)
        return h.expand(-1, n_contexts, -1, -1, -1).reshape(n_tgt * n_contexts * batch, k, -1)

    def forward_context(self, images: Tensor, context_ids: Tensor, target_ids: Tensor) -> Tensor:
        """Encode the context blocks (their patches only) and predict the target blocks."""
        n_ctx = context_ids.shape[0]
        x = images.repeat(n_ctx, 1, 1, 1) if n_ctx > 1 else images
        tokens = self.backbone.forward_visible(x, context_ids.flatten(0, 1))["tokens"]
        return self.predictor(tokens[:, self.backbone.num_prefix_tokens :], context_ids, target_ids)

    def forward_loss(self, pred: Tensor, target: Tensor) -> Tensor:
        return self.loss_fn(pred, target)

    def training_step(self, batch: Batch, step: int, sched: Mapping[str, float]) -> dict[str, Tensor]:
        if "context_ids" not in batch or "target_ids" not in batch:
            raise ValueError("I-JEPA needs multi-block masks in the batch: use its collate (method.masking)")
        images, context_ids, target_ids = batch["crops"][0], batch["context_ids"], batch["target_ids"]
        target = self.forward_target(images, target_ids, context_ids.shape[0])
        pred = self.forward_context(images, context_ids, target_ids)
        loss = self.forward_loss(pred, target)
        return {"loss": loss, "context_patches": loss.new_tensor(float(context_ids.shape[-1])),
                "target_patches": loss.new_tensor(float(target_ids.shape[-1]))}

    def on_step_end(self, step: int, sched: Mapping[str, float]) -> None:
        ema_update(self.target_encoder, self.backbone, float(sched["target_momentum"]))
