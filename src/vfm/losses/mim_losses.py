"""Masked-image-modelling losses on token targets: BEiT's masked code prediction and EVA's
feature regression.

BEiT (Bao et al., "BEiT: BERT Pre-Training of Image Transformers", ICLR 2022; microsoft/unilm
`beit/engine_for_pretraining.py`): cross-entropy between the student's prediction at each masked
position and the tokenizer's code of that patch, averaged over all masked patches of the batch:

    L = - sum_{b, i masked} log softmax(logits_bi)[code_bi] / #masked

EVA (Fang et al., "EVA: Exploring the Limits of Masked Visual Representation Learning at Scale",
CVPR 2023; baaivision/EVA `EVA-01/eva/engine_for_pretraining.py`): negative cosine similarity
between the student's projected tokens and the frozen CLIP teacher's features of the same patches,
on the masked positions (EVA-01) or on all of them:

    L = 1 - mean_{b, i in S} cos(pred_bi, target_bi)

(the paper's -cos shifted by the constant 1, so a perfect match is 0; the gradient is the same).
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor


def masked_token_cross_entropy(logits: Tensor, codes: Tensor, mask: Tensor) -> Tensor:
    """logits: [B, N, K] (or [M, K] already gathered at the masked positions), codes: [B, N] long,
    mask: [B, N] bool (True = masked)."""
    if logits.ndim == 3:
        logits = logits[mask]
    return F.cross_entropy(logits.float(), codes[mask])


def negative_cosine(pred: Tensor, target: Tensor, mask: Tensor | None = None) -> Tensor:
    """pred, target: [B, N, D]; mask: [B, N] bool (None = every token counts)."""
    cos = F.cosine_similarity(pred.float(), target.float(), dim=-1)  # [B, N]
    if mask is not None:
        cos = cos[mask]
    return 1.0 - cos.mean()
