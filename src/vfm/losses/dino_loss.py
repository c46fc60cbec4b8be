"""DINO self-distillation loss with a momentum center.

Caron et al., "Emerging Properties in Self-Supervised Vision Transformers", ICCV 2021;
official code: facebookresearch/dino, `main_dino.py` (`DINOLoss`).

For teacher probabilities P_t = softmax((g_t(x) - c) / tau_t) over global views and student
log-probabilities log P_s = log_softmax(g_s(x') / tau_s) over all views, the loss is

    L = 1 / |pairs| * sum_{t in global} sum_{s != t} mean_batch( -sum_k P_t[k] log P_s[k] )

and after each step the center follows c <- m c + (1 - m) mean(g_t(x)) where the mean is over the
*global* batch (all-reduced across processes, as in the official code).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from vfm.distributed import all_reduce_sum, get_world_size


class DINOLoss(nn.Module):
    """Cross-entropy between centered, sharpened teacher outputs and student outputs.

    Args:
        out_dim: K, the prototype (head output) dimension.
        student_temp: tau_s (0.1 in the paper).
        center_momentum: m for the center EMA (0.9 in the paper).
    """

    def __init__(self, out_dim: int, student_temp: float = 0.1, center_momentum: float = 0.9) -> None:
        super().__init__()
        self.student_temp = student_temp
        self.center_momentum = center_momentum
        self.register_buffer("center", torch.zeros(1, out_dim))

    def forward(
        self, student_out: list[torch.Tensor], teacher_out: list[torch.Tensor], teacher_temp: float
    ) -> torch.Tensor:
        """student_out: n_crops tensors [B, K] (global crops first, in the teacher's order);
        teacher_out: n_global tensors [B, K]. Returns the scalar loss."""
        teacher_probs = [F.softmax((t.float() - self.center) / teacher_temp, dim=-1) for t in teacher_out]
        return self.cross_entropy(student_out, teacher_probs)

    def cross_entropy(self, student_out: list[torch.Tensor], teacher_probs: list[torch.Tensor]) -> torch.Tensor:
        """The loss for given teacher probabilities (centered-softmax here, Sinkhorn-Knopp in DINOv2):
        the mean over (teacher view t, student view s != t) pairs of the batch-mean cross-entropy."""
        student_logp = [F.log_softmax(s.float() / self.student_temp, dim=-1) for s in student_out]
        total, n_terms = student_out[0].new_zeros((), dtype=torch.float32), 0
        for it, p_t in enumerate(teacher_probs):
            for iv, logp_s in enumerate(student_logp):
                if iv == it:  # never compare a view with itself
                    continue
                total = total + torch.sum(-p_t * logp_s, dim=-1).mean()
                n_terms += 1
        self.last_teacher_entropy = torch.stack(
            [-(p * torch.log(p.clamp_min(1e-12))).sum(-1).mean() for p in teacher_probs]
        ).mean().detach()
        return total / n_terms

    @torch.no_grad()
    def update_center(self, teacher_out: torch.Tensor) -> None:
        """teacher_out: [N, K] raw teacher head outputs of all global crops on this process."""
        batch_sum = all_reduce_sum(teacher_out.float().sum(dim=0, keepdim=True))
        batch_center = batch_sum / (teacher_out.shape[0] * get_world_size())
        self.center.mul_(self.center_momentum).add_(batch_center, alpha=1 - self.center_momentum)
