"""BEiT: masked image modelling with discrete visual tokens.

Bao et al., "BEiT: BERT Pre-Training of Image Transformers", ICLR 2022 (microsoft/unilm `beit/`);
Peng et al., "BEiT v2", 2022 (`beit2/`, the VQ-KD tokenizer).

A frozen tokenizer maps each patch of the (unmasked) image to a code; the student ViT sees the same
image with ~40% of its patches (75 of 196 in the paper), chosen in blocks (`BlockMaskGenerator`),
replaced by a learnable mask token, and a linear head on its output tokens predicts the code of
every masked patch (cross-entropy). The tokenizer is any `load_tokenizer` source: a `tokenizer.pt`
trained by `pretrain method=vq_tokenizer` (pixels) or `method=vqkd` (a teacher's features), or a
pickled DALL-E dVAE encoder. Its code grid must equal the student's patch grid.

The paper's student is `backbone=beit_base` (timm's `Beit`: a relative position bias shared by all
blocks, no absolute position embedding, LayerScale 0.1, BEiT's initialisation); any timm ViT works.
As in `modeling_pretrain.py`, the mask token and the head's weights start from a std-0.02 normal cut
at +-1 std, and weight decay skips biases, norms, the position embedding and [CLS], but not the
mask token or the relative position tables.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from vfm.backbones.beit_init import trunc_normal_sigma_
from vfm.data.batch import Batch
from vfm.heads.tokenizer import load_tokenizer
from vfm.losses.mim_losses import masked_token_cross_entropy
from vfm.methods.base import Method, linear_head


class BEiT(Method):
    """Args:
        backbone: a ViT `Backbone` (given a mask token here).
        tokenizer: path of the tokenizer (a run directory, `tokenizer.pt`, or a DALL-E `.pkl`).
        mean, std: the data normalisation (a pickled DALL-E encoder takes raw pixels).
    """

    needs_patch_tokens = True
    frozen_modules = ("tokenizer",)
    token_weight_decay = False  # unilm beit/ `create_optimizer` skips no_weight_decay(): pos_embed, cls_token

    def __init__(self, backbone: nn.Module, *, tokenizer: str, mean: list[float] | None = None,
                 std: list[float] | None = None) -> None:
        super().__init__()
        backbone.enable_mask_token(std=0.02)
        self.backbone = backbone
        self.patch_size = int(backbone.patch_size)
        self.tokenizer = load_tokenizer(tokenizer, mean=mean, std=std, patch_size=self.patch_size)
        tok_patch = getattr(self.tokenizer, "patch_size", self.patch_size)
        if tok_patch != self.patch_size:
            raise ValueError(f"tokenizer {tokenizer} has {tok_patch} px patches but the student has {self.patch_size}: "
                             f"the code grid must equal the patch grid; set backbone.patch_size={tok_patch}")
        self.head = linear_head(backbone.embed_dim, int(self.tokenizer.num_codes))
        trunc_normal_sigma_(self.head.weight.data, 0.02)  # BEiT's lm_head: cut at +-std, not timm's +-2

    def param_groups(self) -> list[dict[str, Any]]:
        """The base groups, with the relative position tables decayed: unilm's pretraining model
        exempts only pos_embed and cls_token (`no_weight_decay`); timm's Beit also lists the tables."""
        groups = {g["name"]: g for g in super().param_groups()}
        tables = {id(p) for n, p in self.named_parameters() if "relative_position_bias_table" in n}
        moved = [p for p in groups["no_decay"]["params"] if id(p) in tables]
        groups["no_decay"]["params"] = [p for p in groups["no_decay"]["params"] if id(p) not in tables]
        groups["decay"]["params"] = groups["decay"]["params"] + moved
        return list(groups.values())

    @property
    def encoder(self) -> nn.Module:
        return self.backbone

    def training_step(self, batch: Batch, step: int, sched: Mapping[str, float]) -> dict[str, Tensor]:
        if "masks" not in batch:
            raise ValueError("BEiT needs patch masks in the batch: configure method.masking")
        images, mask = batch["crops"][0], batch["masks"][0]
        with torch.no_grad():
            codes = self.tokenizer(images)
        if codes.shape != mask.shape:
            raise ValueError(f"the tokenizer gives a code grid of {codes.shape[1]} tokens but the student has "
                             f"{mask.shape[1]} patches; use a tokenizer trained at this resolution and patch size")
        tokens = self.backbone.forward_tokens(images, mask=mask)["patch"]
        logits = self.head(tokens[mask])  # only the masked positions are predicted
        loss = masked_token_cross_entropy(logits, codes, mask)
        acc = (logits.argmax(-1) == codes[mask]).float().mean()
        return {"loss": loss, "mim_acc": acc.detach(), "mask_ratio": mask.float().mean()}
