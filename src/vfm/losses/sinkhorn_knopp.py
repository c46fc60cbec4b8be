"""Sinkhorn-Knopp centering of teacher outputs (SwAV, used by DINOv2 instead of the DINO center).

Caron et al., "Unsupervised Learning of Visual Features by Contrasting Cluster Assignments" (SwAV),
NeurIPS 2020, section 3.1 and Algorithm 1; Cuturi, "Sinkhorn Distances", NeurIPS 2013.
Oquab et al., "DINOv2: Learning Robust Visual Features without Supervision", TMLR 2024; official
code: facebookresearch/dinov2, `dinov2/loss/dino_clstoken_loss.py` (`sinkhorn_knopp_teacher`) and
`dinov2/loss/ibot_patch_loss.py` (the same for masked patch tokens).

Given teacher logits for the B_g samples of the global batch over K prototypes, find the assignment
Q (K x B_g) closest to exp(logits / tau_t) whose prototypes are used equally:

    Q in { Q >= 0 : Q 1_{B_g} = 1_K / K,  Q^T 1_K = 1_{B_g} / B_g }

by alternately rescaling rows (each prototype's total mass 1/K) and columns (each sample's mass
1/B_g), starting from exp(logits / tau_t) normalised to total mass 1. The result is multiplied by
B_g so every sample's distribution over prototypes sums to 1. Rows span the global batch, so their
sums are all-reduced across processes; columns are local to a process.
"""

from __future__ import annotations

import torch
from torch import Tensor

from vfm.distributed import all_gather, all_reduce_sum

__all__ = ["sinkhorn_knopp"]

# exp() overflows fp32 just above 88.7; keep the largest exponent a little below.
_MAX_EXP_ARG = 80.0


@torch.no_grad()
def sinkhorn_knopp(teacher_logits: Tensor, teacher_temp: float, n_iterations: int = 3) -> Tensor:
    """Teacher probabilities with (approximately) uniform prototype usage over the global batch.

    Args:
        teacher_logits: [B, K] this process's teacher head outputs (the [CLS] outputs of the global
            crops, or the M masked patch tokens). B may differ between processes.
        teacher_temp: tau_t.
        n_iterations: row/column normalisation rounds (3 in DINOv2; more gets closer to the marginals).

    Returns:
        [B, K] fp32 probabilities: each row sums to 1, and summed over the global batch each
        prototype's column gets ~B_g / K (exactly B_g / K only in the limit of many iterations).

    Deviations from DINOv2, both value-preserving:
    * B_g is the all-reduced row count, not B * world_size. They agree when every process has the
      same B ([CLS] tokens); for masked patch tokens the counts differ and DINOv2's patch variant
      all-reduces `n_masked_patches` for the same reason. (For n_iterations >= 1, B_g is a uniform
      factor that the next normalisation removes, so only the n_iterations=0 output depends on it.)
    * If the largest logits / tau_t of the global batch exceeds 80, all logits are shifted down so
      that it becomes 80. The constant factor cancels in the first normalisation, and it keeps exp()
      from overflowing fp32 (at ~88.7) to inf and NaN. DINOv2 relies on its weight-normalised head
      keeping |logits| <= 1; below the threshold the computation is exactly DINOv2's. (Shifting by the
      full maximum instead would underflow whole prototype rows to 0 when the logits are spread out.)

    With n_iterations=0 the output is exp(logits / tau_t) normalised to total mass B_g over the
    global batch, not per row (as in DINOv2).
    """
    if teacher_logits.ndim != 2:
        raise ValueError(f"teacher_logits must be [B, K], got {tuple(teacher_logits.shape)}")
    if n_iterations < 0:
        raise ValueError(f"n_iterations must be >= 0, got {n_iterations}")
    # fp32 throughout: the marginals are tiny numbers (1 / (K * B_g)) that bf16/fp16 would flush.
    logits = teacher_logits.float() / teacher_temp
    n_local, n_prototypes = logits.shape
    local_max = logits.max() if n_local > 0 else logits.new_full((), float("-inf"))
    shift = (all_gather(local_max.reshape(1)).max() - _MAX_EXP_ARG).clamp(min=0.0)
    q = torch.exp(logits - shift).t()  # [K, B]: SwAV's notation, prototypes x samples
    n_global = all_reduce_sum(logits.new_tensor(float(n_local)))

    q /= all_reduce_sum(q.sum())
    for _ in range(n_iterations):
        # Rows: every prototype gets total mass 1/K over the *global* batch.
        q /= all_reduce_sum(q.sum(dim=1, keepdim=True))
        q /= n_prototypes
        # Columns: every sample gets mass 1/B_g (a column lives on one process: no reduction).
        q /= q.sum(dim=0, keepdim=True)
        q /= n_global
    q *= n_global  # each sample's column now sums to 1: an assignment
    return q.t()
