"""I-JEPA's regression loss in representation space.

Assran et al., "Self-Supervised Learning from Images with a Joint-Embedding Predictive
Architecture", CVPR 2023; official code facebookresearch/ijepa `src/train.py` (`forward_target`,
`loss_fn`).

The targets are the target encoder's output patch tokens, layer-normalised over the feature
dimension without affine parameters (`F.layer_norm(h, (h.size(-1),))`). The paper writes the loss as
the average L2 distance between predicted and target patch representations; the released code
trains with `F.smooth_l1_loss(z, h)` (Huber loss with beta = 1, averaged over every target block,
patch and feature), which is the default here; `kind="l2"` is the mean squared error.

Under DDP each process averages over its own blocks; the gradient all-reduce of DDP then averages
the processes, as the official code does (its `AllReduce` of the loss only affects what is logged).
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

_KINDS = ("smooth_l1", "l2")


def normalize_targets(h: Tensor) -> Tensor:
    """[..., D] -> the same, each vector layer-normalised over D (zero mean, unit variance, eps
    1e-5, no affine), computed in float32."""
    return F.layer_norm(h.float(), (h.shape[-1],))


class IJEPALoss(nn.Module):
    """mean over blocks, patches and features of smooth_l1(pred - target) (or (pred - target)^2).

    Args:
        kind: "smooth_l1" (the official code; Huber with `beta`) or "l2" (the paper's formula).
        beta: the smooth-L1 threshold (1.0, PyTorch's default, in the official code).

    Shapes: pred, target [M, K, D] (M = target blocks x context blocks x images); target already
    normalised with `normalize_targets`. Returns a float32 scalar.
    """

    def __init__(self, kind: str = "smooth_l1", beta: float = 1.0) -> None:
        super().__init__()
        if kind not in _KINDS:
            raise ValueError(f"loss must be one of {_KINDS}, got {kind!r}")
        if beta <= 0:
            raise ValueError(f"the smooth-L1 beta must be > 0, got {beta}")
        self.kind, self.beta = kind, float(beta)

    def forward(self, pred: Tensor, target: Tensor) -> Tensor:
        if pred.shape != target.shape:
            raise ValueError(f"prediction {tuple(pred.shape)} and target {tuple(target.shape)} differ in shape")
        pred, target = pred.float(), target.float()
        if self.kind == "l2":
            return F.mse_loss(pred, target)
        return F.smooth_l1_loss(pred, target, beta=self.beta)
