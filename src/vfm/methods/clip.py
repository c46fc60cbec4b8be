"""CLIP: contrastive language-image pretraining.

Radford et al., "Learning Transferable Visual Models From Natural Language Supervision", ICML 2021;
open_clip (mlfoundations/open_clip: `model.py` `CLIP`, `loss.py` `ClipLoss`, `train.py`).

An image tower (any backbone here) and a text tower (`vfm.heads.text`: CLIP's causal text
Transformer on bytes, or a pretrained Hugging Face model, frozen as in LiT or tuned) are projected
to a shared space; matching image–caption pairs are pulled together and the other pairs of the
global batch pushed apart with a symmetric InfoNCE loss (`CLIPLoss`). The temperature is learnt as
`logit_scale = log(1 / tau)`, initialised at log(1 / 0.07) and clamped to [0, log(100)] after every
step (the paper's clamp at 100).

The image tower of the paper's run is `backbone=vit_base_clip` (open_clip's ViT-B/16, with the
LayerNorm before the first block, `ln_pre`); any other backbone works, a ViT without that norm
gets a warning. Weight decay follows open_clip's `main.py`: none on gains, biases, the
temperature and the [CLS] token (1-D in open_clip), decay on everything else, position
embeddings included.

Zero-shot classification uses `encode_image` / `encode_text`: class-name prompts become a linear
classifier over the image embeddings.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vfm.data.batch import Batch
from vfm.data.collate import ImageTextCollate
from vfm.losses.clip_loss import CLIPLoss
from vfm.methods.base import Method

log = logging.getLogger(__name__)


class CLIP(Method):
    """Args:
        backbone: the image tower (any `Backbone`).
        text_tower: a module with `tokenize(list[str])`, `forward(tokens) -> [B, output_dim]` and
            `output_dim` (`vfm.heads.text.TextTransformer` or `HFTextTower`).
        embed_dim: the shared embedding width (the image projection's output; the text tower
            projects to it itself).
        init_logit_scale: log(1 / 0.07), CLIP's initial temperature.
        max_logit_scale: the clamp of exp(logit_scale) (100 in CLIP).
        local_loss: open_clip's local-loss option (see `CLIPLoss`).
        decay_embeddings: whether the position embeddings get weight decay: yes with the rule of
            open_clip's published runs (`legacy_main.py`: only `ndim < 2`, norms, biases and
            `logit_scale` are exempt); False follows its current `optim.make_wd_exclude`, which also
            exempts the models' `no_weight_decay()` position embeddings.
    """

    needs_captions = True  # checked against the dataset before anything is built

    def __init__(
        self,
        backbone: nn.Module,
        *,
        text_tower: nn.Module,
        embed_dim: int = 512,
        init_logit_scale: float = math.log(1 / 0.07),
        max_logit_scale: float = 100.0,
        local_loss: bool = False,
        decay_embeddings: bool = True,
    ) -> None:
        super().__init__()
        if int(text_tower.output_dim) != embed_dim:
            raise ValueError(f"the text tower outputs {text_tower.output_dim} features but method.embed_dim={embed_dim}; "
                             "set the tower's output_dim to ${..embed_dim}")
        norm_pre = getattr(getattr(backbone, "model", None), "norm_pre", None)
        if isinstance(norm_pre, nn.Identity):
            log.warning("CLIP's image tower has a LayerNorm before its first block (ln_pre) and this ViT has none: "
                        "use backbone=vit_base_clip or +backbone.model_kwargs.pre_norm=true for the paper's architecture")
        self.backbone = backbone
        self.text_tower = text_tower
        # CLIP's image projection: a bias-free linear map, init std width^-0.5
        self.image_projection = nn.Linear(int(backbone.embed_dim), embed_dim, bias=False)
        nn.init.normal_(self.image_projection.weight, std=int(backbone.embed_dim) ** -0.5)
        self.logit_scale = nn.Parameter(torch.tensor(float(init_logit_scale)))
        self.max_log_scale = math.log(max_logit_scale)
        self.loss_fn = CLIPLoss(local_loss=local_loss)
        self.decay_embeddings = decay_embeddings

    @property
    def encoder(self) -> nn.Module:
        return self.backbone

    def build_collate(self, augment: Any, masking: Callable[..., Tensor] | None = None) -> ImageTextCollate:
        """Images are augmented and captions tokenized in the data pipeline (no masks)."""
        return ImageTextCollate(augment, self.text_tower.tokenize)

    @property
    def text_model(self) -> CLIP:
        """CLIP is its own text model: zero-shot uses `encode_text` and `project_image`."""
        return self

    def project_image(self, features: Tensor) -> Tensor:
        """Global image features [B, D_img] -> l2-normalised embeddings [B, embed_dim]."""
        return F.normalize(self.image_projection(features).float(), dim=-1)

    def encode_image(self, images: Tensor) -> Tensor:
        return self.project_image(self.backbone(images))

    def encode_text(self, texts: list[str] | Any) -> Tensor:
        """Captions (strings, or tokens from `text_tower.tokenize`) -> l2-normalised embeddings."""
        tokens = self.text_tower.tokenize(texts) if isinstance(texts, list) and isinstance(texts[0], str) else texts
        device = self.logit_scale.device
        tokens = {k: v.to(device) for k, v in tokens.items()} if isinstance(tokens, dict) else tokens.to(device)
        return F.normalize(self.text_tower(tokens).float(), dim=-1)

    def training_step(self, batch: Batch, step: int, sched: Mapping[str, float]) -> dict[str, Tensor]:
        if "text" not in batch:
            raise ValueError("CLIP needs captions: use an image-text dataset (e.g. dataset=fashion_mnist_captions)")
        image_emb = self.encode_image(batch["crops"][0])
        text_emb = self.encode_text(batch["text"])
        loss = self.loss_fn(image_emb, text_emb, self.logit_scale)
        return {"loss": loss, "logit_scale": self.logit_scale.detach().exp()}

    def param_groups(self) -> list[dict[str, Any]]:
        """open_clip `legacy_main.py`: no weight decay where `p.ndim < 2` or the name has "bn", "ln"
        or "bias" or is `logit_scale`; timm's `cls_token` is [1, 1, D] where open_clip's
        `class_embedding` is 1-D, so it is exempt too. Position embeddings (2-D there) decay unless
        `decay_embeddings` is False."""
        embeddings = ("pos_embed", "positional_embedding", "reg_token")
        decay, no_decay = [], []
        for name, p in self.named_parameters():
            if not p.requires_grad:
                continue
            exempt = p.ndim < 2 or name.endswith((".bias", "cls_token")) or name == "logit_scale"
            exempt |= not self.decay_embeddings and name.endswith(embeddings)
            (no_decay if exempt else decay).append(p)
        return [
            {"params": decay, "wd_mult": 1.0, "lr_mult": 1.0, "name": "decay"},
            {"params": no_decay, "wd_mult": 0.0, "lr_mult": 1.0, "name": "no_decay"},
        ]

    @torch.no_grad()
    def on_step_end(self, step: int, sched: Mapping[str, float]) -> None:
        self.logit_scale.clamp_(0.0, self.max_log_scale)
