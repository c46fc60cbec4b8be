"""MAE's reconstruction loss (He et al., "Masked Autoencoders Are Scalable Vision Learners", CVPR
2022; facebookresearch/mae `models_mae.py`, `forward_loss`).

    target_i = patch i's pixels, optionally normalised per patch: (x - mean) / sqrt(var + 1e-6)
    L = sum_i m_i * mean_j (pred_ij - target_ij)^2 / sum_i m_i

with m_i = 1 for masked patches: visible patches do not count. `var` is the unbiased variance over
the patch's pixels (as in the official code).
"""

from __future__ import annotations

from torch import Tensor, nn


class MAELoss(nn.Module):
    """pred, target: [B, N, p*p*C] (target = `patchify(images)`), mask: [B, N] bool (True = masked)."""

    def __init__(self, norm_pix_loss: bool = True) -> None:
        super().__init__()
        self.norm_pix_loss = norm_pix_loss

    def normalize_target(self, target: Tensor) -> Tensor:
        if not self.norm_pix_loss:
            return target
        mean = target.mean(dim=-1, keepdim=True)
        var = target.var(dim=-1, keepdim=True)
        return (target - mean) / (var + 1.0e-6) ** 0.5

    def forward(self, pred: Tensor, target: Tensor, mask: Tensor) -> Tensor:
        per_patch = (pred.float() - self.normalize_target(target.float())).pow(2).mean(dim=-1)  # [B, N]
        m = mask.to(per_patch.dtype)
        return (per_patch * m).sum() / m.sum().clamp_min(1.0)
