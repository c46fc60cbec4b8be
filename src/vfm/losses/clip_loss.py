"""CLIP's symmetric contrastive (InfoNCE) loss over the global batch.

Radford et al., "Learning Transferable Visual Models From Natural Language Supervision", ICML 2021;
open_clip (mlfoundations/open_clip `loss.py`, `ClipLoss`).

With l2-normalised image features I [B, D] and text features T [B, D] of matching pairs and the
learnt temperature t = exp(logit_scale):

    logits = t * I @ T^T          (image -> text; its transpose is text -> image)
    L = ( CE(logits, arange(B)) + CE(logits^T, arange(B)) ) / 2

Under DDP the features of every process are all-gathered **with gradients**, so the negatives are
the whole global batch, as in single-process training on that batch. `local_loss=True` (open_clip's
`--local-loss`) keeps only this process's rows — local features against all gathered ones — which
costs O(B_local x B_global) instead of O(B_global^2) and gives the same gradients in expectation.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vfm import distributed as vdist


class CLIPLoss(nn.Module):
    """image_features, text_features: [B, D] (l2-normalised), logit_scale: scalar (log of the
    temperature's inverse, already clamped). Returns the scalar loss."""

    def __init__(self, local_loss: bool = False) -> None:
        super().__init__()
        self.local_loss = local_loss

    def forward(self, image_features: Tensor, text_features: Tensor, logit_scale: Tensor) -> Tensor:
        scale = logit_scale.exp()
        all_img = vdist.all_gather_with_grad(image_features)
        all_txt = vdist.all_gather_with_grad(text_features)
        if self.local_loss:
            b = image_features.shape[0]
            labels = torch.arange(b, device=image_features.device) + vdist.get_rank() * b
            logits_img = scale * image_features @ all_txt.T
            logits_txt = scale * text_features @ all_img.T
        else:
            labels = torch.arange(all_img.shape[0], device=image_features.device)
            logits_img = scale * all_img @ all_txt.T
            logits_txt = logits_img.T
        return 0.5 * (F.cross_entropy(logits_img.float(), labels) + F.cross_entropy(logits_txt.float(), labels))
