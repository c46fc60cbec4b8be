"""SigLIP: CLIP with a pairwise sigmoid loss instead of the batch softmax.

Zhai et al., "Sigmoid Loss for Language Image Pre-Training", ICCV 2023; big_vision
(`trainers/proj/image_text/siglip.py`, `models/proj/image_text/two_towers.py`), open_clip
(`loss.py` `SigLipLoss`, `model.py` `init_logit_bias`).

The towers, projections, collate and zero-shot interface are CLIP's (`vfm.methods.clip.CLIP`); the
differences are the loss (`SigLIPLoss`: every image-text pair a binary classification, the text
features passed between neighbouring processes under DDP) and its two learnt scalars: the
temperature t = exp(t'), t' initialised at log 10, and a bias b initialised at -10, so that at the
start the many negatives (B - 1 per image) do not dominate the loss. The official trainer does not
clamp t (CLIP clamps it at 100); `max_logit_scale` restores a clamp. Weight decay follows
big_vision's `optax.py` (`wd_mults=[(".*/kernel$", 1.0)]`): only the kernels of dense and
convolution layers decay, not the embeddings, tokens, biases, norms or the two scalars.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from vfm.data.batch import Batch
from vfm.losses.siglip_loss import SigLIPLoss
from vfm.methods.clip import CLIP


class SigLIP(CLIP):
    """Args:
        backbone, text_tower, embed_dim: as `CLIP`.
        init_logit_scale: t' at the start (log 10).
        init_logit_bias: b at the start (-10).
        max_logit_scale: clamp exp(t') at this value after every step; None (the paper): no clamp.
        dist_impl: how text features travel between processes, "bidir" or "shift" (`SigLIPLoss`).
        decay_kernels_only: weight decay on the weights of the Linear and Conv layers only, as
            big_vision (a flax "kernel"); False: CLIP's grouping (`CLIP.param_groups`: everything
            but 1-D parameters, biases, [CLS] and the scalars, position and token embeddings included).
    """

    def __init__(
        self,
        backbone: nn.Module,
        *,
        text_tower: nn.Module,
        embed_dim: int = 768,
        init_logit_scale: float = math.log(10.0),
        init_logit_bias: float = -10.0,
        max_logit_scale: float | None = None,
        dist_impl: str = "bidir",
        decay_kernels_only: bool = True,
    ) -> None:
        super().__init__(backbone, text_tower=text_tower, embed_dim=embed_dim, init_logit_scale=init_logit_scale,
                         max_logit_scale=max_logit_scale or 100.0)
        self.clamp_logit_scale = max_logit_scale is not None
        self.logit_bias = nn.Parameter(torch.tensor(float(init_logit_bias)))
        self.loss_fn = SigLIPLoss(dist_impl=dist_impl)
        self.decay_kernels_only = decay_kernels_only

    def training_step(self, batch: Batch, step: int, sched: Mapping[str, float]) -> dict[str, Tensor]:
        if "text" not in batch:
            raise ValueError("SigLIP needs captions: use an image-text dataset (e.g. dataset=fashion_mnist_captions)")
        image_emb = self.encode_image(batch["crops"][0])
        text_emb = self.encode_text(batch["text"])
        loss = self.loss_fn(image_emb, text_emb, self.logit_scale, self.logit_bias)
        return {"loss": loss, "logit_scale": self.logit_scale.detach().exp(), "logit_bias": self.logit_bias.detach()}

    def param_groups(self) -> list[dict[str, Any]]:
        """big_vision `optax.make`: decay only where the flax name ends in `/kernel`, i.e. the
        weights of Dense and Conv layers; flax calls an embedding table `embedding`, a position
        embedding `pos_embedding`, a norm's gain `scale`, so none of those decay."""
        if not self.decay_kernels_only:
            return super().param_groups()
        kernels = {id(m.weight) for m in self.modules()
                   if isinstance(m, (nn.Linear, nn.modules.conv._ConvNd)) and m.weight.ndim >= 2}
        decay, no_decay = [], []
        for p in self.parameters():
            if p.requires_grad:
                (decay if id(p) in kernels else no_decay).append(p)
        return [
            {"params": decay, "wd_mult": 1.0, "lr_mult": 1.0, "name": "decay"},
            {"params": no_decay, "wd_mult": 0.0, "lr_mult": 1.0, "name": "no_decay"},
        ]

    @torch.no_grad()
    def on_step_end(self, step: int, sched: Mapping[str, float]) -> None:
        if self.clamp_logit_scale:
            self.logit_scale.clamp_(0.0, self.max_log_scale)
