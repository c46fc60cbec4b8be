"""iBOT masked-patch self-distillation loss (the MIM term of iBOT and DINOv2).

Zhou et al., "iBOT: Image BERT Pre-Training with Online Tokenizer", ICLR 2022; official code:
bytedance/ibot, `main_ibot.py` (`iBOTLoss`, the `v == q` branch and `update_center`).
Oquab et al., "DINOv2: Learning Robust Visual Features without Supervision", TMLR 2024; official
code: facebookresearch/dinov2, `dinov2/loss/ibot_patch_loss.py` (`iBOTPatchLoss.forward_masked`).

The student sees view u with a mask m (mask tokens replace the masked patches), the teacher sees u
unmasked. For image b with patch outputs s_bi (student) and t_bi (teacher), i = 1..N,

    P_t(bi) = softmax((t_bi - c) / tau_t),   log P_s(bi) = log_softmax(s_bi / tau_s)
    l_b     = 1 / max(1, sum_i m_bi) * sum_i m_bi * ( -sum_k P_t(bi)[k] log P_s(bi)[k] )
    L       = 1 / B * sum_b l_b

i.e. the cross-entropy averaged over each image's masked patches, then over *all* B images of the
batch: an image without masked patches contributes l_b = 0 but still counts in the 1 / B (as in the
official code, `loss2.mean()` over the batch after the per-image `/ mask.sum(-1).clamp(min=1)`).
Half of the global crops are masked in iBOT's ViT-S/16 run (`--pred_ratio 0 0.3 --pred_ratio_var
0 0.2`: ratio 0 or U(0.1, 0.5) per crop, `method.masking.mask_probability: 0.5`) and in DINOv2
(`mask_probability: 0.5`), so this roughly halves the loss compared with averaging over masked
images only; the paper's loss weight lambda_2 = 1 is tuned with this convention.

The center is the patch-token analogue of DINO's: c <- m c + (1 - m) mean(t), the mean over all
patches of all images of the *global* batch (all-reduced across processes), computed from every
patch, masked or not.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vfm.distributed import all_reduce_sum, get_world_size

__all__ = ["iBOTPatchLoss", "masked_patch_cross_entropy"]


class iBOTPatchLoss(nn.Module):  # noqa: N801 - the paper's spelling
    """Cross-entropy between centered, sharpened teacher patch outputs and student patch outputs on masked patches.

    Args:
        out_dim: K, the patch head's output dimension (8192 in iBOT, shared with the [CLS] head or not).
        student_temp: tau_s (0.1 in the paper).
        center_momentum: m for the patch-center EMA (0.9 in the paper).
    """

    def __init__(self, out_dim: int, student_temp: float = 0.1, center_momentum: float = 0.9) -> None:
        super().__init__()
        self.student_temp = student_temp
        self.center_momentum = center_momentum
        self.register_buffer("center", torch.zeros(1, 1, out_dim))

    def forward(self, student_patch: Tensor, teacher_patch: Tensor, masks: Tensor, teacher_temp: float) -> Tensor:
        """Masked-patch loss L (module docstring).

        Args:
            student_patch: [B, N, K] student head outputs for the patch tokens of the masked view.
            teacher_patch: [B, N, K] teacher head outputs for the same view, unmasked (no gradient is taken).
            masks: bool [B, N], True where the student saw a mask token.
            teacher_temp: tau_t for this iteration (scheduled by the engine).

        Returns:
            the scalar loss (fp32).
        """
        if student_patch.shape != teacher_patch.shape or masks.shape != student_patch.shape[:2]:
            raise ValueError(
                f"shape mismatch: student {tuple(student_patch.shape)}, teacher {tuple(teacher_patch.shape)}, "
                f"masks {tuple(masks.shape)} (expected [B, N, K], [B, N, K], [B, N])"
            )
        masks = masks.bool()
        with torch.no_grad():
            teacher_probs = F.softmax((teacher_patch.float() - self.center) / teacher_temp, dim=-1)
        student_logp = F.log_softmax(student_patch.float() / self.student_temp, dim=-1)
        per_patch = -(teacher_probs * student_logp).sum(dim=-1)  # [B, N]
        # where(), not a multiply: a non-finite value at an unmasked patch must not leak into the loss.
        per_patch = torch.where(masks, per_patch, per_patch.new_zeros(()))
        per_image = per_patch.sum(dim=-1) / masks.sum(dim=-1).clamp(min=1)  # [B]
        return per_image.mean()

    @torch.no_grad()
    def update_center(self, teacher_patch: Tensor) -> None:
        """teacher_patch: [B, N, K] raw teacher patch outputs on this process (all patches, masked or not)."""
        # Sum of per-image means, as in the official code; equals the mean over all B * N patches.
        batch_sum = all_reduce_sum(teacher_patch.float().mean(dim=1).sum(dim=0))
        batch_center = (batch_sum / (teacher_patch.shape[0] * get_world_size())).view(1, 1, -1)
        self.center.mul_(self.center_momentum).add_(batch_center, alpha=1 - self.center_momentum)


def masked_patch_cross_entropy(
    student_patch_masked: Tensor,
    teacher_probs_masked: Tensor,
    masks_weight: Tensor,
    student_temp: float,
    *,
    n_images: int,
) -> Tensor:
    """The iBOT patch loss computed on the masked tokens only (DINOv2 `iBOTPatchLoss.forward_masked`).

    DINOv2 gathers the M masked tokens of the whole local batch before the heads, so the teacher's
    probabilities (usually from `vfm.losses.sinkhorn_knopp.sinkhorn_knopp`, or a centered softmax)
    and the student's outputs arrive as [M, K]. With w_m = 1 / (number of masked patches of the image
    token m belongs to), the loss

        L = -1 / B * sum_m w_m * sum_k q_mk * log_softmax(s_m / tau_s)_k

    equals `iBOTPatchLoss.forward` on the full [B, N, K] tensors with the same teacher probabilities:
    per-image means over masked patches, averaged over all B images (unmasked images count as 0).

    Args:
        student_patch_masked: [M, K] student head outputs of the masked tokens.
        teacher_probs_masked: [M, K] teacher probabilities (rows sum to 1) of the same tokens.
        masks_weight: [M] per-token weights 1 / n_masked(image), as built by DINOv2's collate
            (`(1 / masks.sum(-1).clamp(min=1)).unsqueeze(-1).expand_as(masks)[masks]`).
        student_temp: tau_s.
        n_images: B, the number of images (masked or not) the tokens came from. Not in the signature
            of the official method, which reads it from the [B, N] mask; required here because it
            cannot be recovered from the weights (they sum to the number of *masked* images).

    Returns:
        the scalar loss (fp32).

    DINOv2 pads the masked tokens to a fixed upper bound and slices with `n_masked_patches`; callers
    that pad should slice before calling this.
    """
    if student_patch_masked.shape != teacher_probs_masked.shape or masks_weight.shape != student_patch_masked.shape[:1]:
        raise ValueError(
            f"shape mismatch: student {tuple(student_patch_masked.shape)}, teacher {tuple(teacher_probs_masked.shape)}, "
            f"masks_weight {tuple(masks_weight.shape)} (expected [M, K], [M, K], [M])"
        )
    if n_images < 1:
        raise ValueError(f"n_images must be >= 1, got {n_images}")
    student_logp = F.log_softmax(student_patch_masked.float() / student_temp, dim=-1)
    per_token = (teacher_probs_masked.float() * student_logp).sum(dim=-1)  # [M]
    return -(per_token * masks_weight.float()).sum() / n_images
