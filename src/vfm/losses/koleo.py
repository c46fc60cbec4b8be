"""KoLeo regulariser: the Kozachenko-Leonenko differential-entropy estimator, as a loss.

Sablayrolles et al., "Spreading vectors for similarity search", ICLR 2019 (section 3.2);
used on the student's [CLS] features by Oquab et al., "DINOv2: Learning Robust Visual Features
without Supervision", TMLR 2024; official code: facebookresearch/dinov2, `dinov2/loss/koleo_loss.py`.

For a batch x_1..x_B, L2-normalised, with d_i = min_{j != i} ||x_i - x_j|| the distance to the
nearest other sample,

    L_koleo = -1 / B * sum_i log(d_i + eps)

Up to constants this is minus the Kozachenko-Leonenko entropy estimate, so minimising it spreads the
features uniformly over the sphere. The nearest neighbour is found by the largest inner product
(equivalent on the unit sphere) and is not differentiated through (argmax); gradients flow through d_i.

As in DINOv2 the loss is computed on each process's local batch (no gather): nearest neighbours are
taken among this process's samples only.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["KoLeoLoss"]


class KoLeoLoss(nn.Module):
    """-mean_i log(distance from x_i to its nearest neighbour), on L2-normalised rows, in fp32."""

    def forward(self, x: Tensor, eps: float = 1e-8) -> Tensor:
        """x: [B, D] features (B >= 2). Returns the scalar loss (fp32)."""
        if x.ndim != 2 or x.shape[0] < 2:
            raise ValueError(f"KoLeo needs x of shape [B, D] with B >= 2, got {tuple(x.shape)}")
        # Autocast off: the log of small distances and the argmax over near-ties need fp32.
        with torch.autocast(device_type=x.device.type, enabled=False):
            z = F.normalize(x.float(), p=2, dim=-1, eps=eps)
            with torch.no_grad():
                dots = z @ z.t()
                # -inf, not DINOv2's -1: with -1 an antipodal neighbour (dot = -1) ties with the
                # diagonal and argmax may return the sample itself (distance 0).
                dots.fill_diagonal_(float("-inf"))
                nn_idx = dots.argmax(dim=1)
            # DINOv2 uses nn.PairwiseDistance(eps=1e-8), i.e. ||x_i - x_j + eps||; the plain norm
            # differs by O(eps) and vector_norm's gradient at a duplicate (distance 0) is 0, not NaN.
            distances = torch.linalg.vector_norm(z - z[nn_idx], ord=2, dim=-1)
            return -torch.log(distances + eps).mean()
