"""The raw-pixel baseline: an "encoder" whose features are the normalised input pixels.

`evaluate checkpoint=pixels` puts every evaluator on the same footing as a learnt encoder: the
frozen-feature evaluators see `[B, C*H*W]` pixel vectors (kNN L2-normalises them, the linear probe
standardises them with train statistics). A pretrained encoder that does not beat this row has
learnt nothing a linear classifier could not read from the pixels.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


class PixelEncoder(nn.Module):
    """`[B, C, H, W]` images -> `[B, C*H*W]` float32 features (no parameters)."""

    embed_dim: int | None = None  # known only once an image has been seen

    def forward(self, images: Tensor) -> Tensor:
        return images.flatten(1).to(torch.float32)
