import math

import pytest
import torch
import torch.nn.functional as F

from vfm.losses.ibot_loss import iBOTPatchLoss, masked_patch_cross_entropy


def _reference(student, teacher, masks, center, tau_s, tau_t):
    """Direct loop over images and patches (iBOT paper / official code)."""
    per_image = []
    for b in range(student.shape[0]):
        total, n = 0.0, 0
        for i in range(student.shape[1]):
            if masks[b, i]:
                p = torch.softmax((teacher[b, i] - center.flatten()) / tau_t, dim=-1)
                logq = F.log_softmax(student[b, i] / tau_s, dim=-1)
                total += -(p * logq).sum().item()
                n += 1
        per_image.append(total / max(n, 1))
    return sum(per_image) / len(per_image)


def test_one_masked_patch_by_hand():
    # B=1, N=2, K=2; only patch 0 is masked. Teacher [1, 0] at tau_t=1: p = (e, 1) / (1 + e).
    # Student [0.1, 0] at tau_s=0.1: logits [1, 0], log q = (1 - ln(1 + e), -ln(1 + e)).
    # CE = -(p0 (1 - ln(1 + e)) - p1 ln(1 + e)) = ln(1 + e) - e / (1 + e).
    loss_fn = iBOTPatchLoss(out_dim=2, student_temp=0.1)
    student = torch.tensor([[[0.1, 0.0], [3.0, -2.0]]])
    teacher = torch.tensor([[[1.0, 0.0], [-4.0, 5.0]]])
    masks = torch.tensor([[True, False]])
    expected = math.log(1 + math.e) - math.e / (1 + math.e)
    assert math.isclose(loss_fn(student, teacher, masks, teacher_temp=1.0).item(), expected, rel_tol=1e-6)


def test_image_without_masks_counts_as_zero_in_the_batch_mean():
    loss_fn = iBOTPatchLoss(out_dim=2, student_temp=0.1)
    student = torch.tensor([[[0.1, 0.0], [0.0, 0.0]], [[7.0, 1.0], [2.0, 3.0]]])
    teacher = torch.tensor([[[1.0, 0.0], [0.0, 0.0]], [[0.0, 9.0], [1.0, 1.0]]])
    masks = torch.tensor([[True, False], [False, False]])
    one_image = math.log(1 + math.e) - math.e / (1 + math.e)
    assert math.isclose(loss_fn(student, teacher, masks, 1.0).item(), one_image / 2, rel_tol=1e-6)


def test_matches_formula_with_center_and_temperatures():
    torch.manual_seed(0)
    B, N, K, tau_s, tau_t = 3, 6, 5, 0.1, 0.04
    loss_fn = iBOTPatchLoss(out_dim=K, student_temp=tau_s)
    loss_fn.center.copy_(torch.randn(1, 1, K))
    student, teacher = torch.randn(B, N, K), torch.randn(B, N, K)
    masks = torch.tensor([[1, 1, 0, 0, 1, 0], [0, 0, 0, 0, 0, 0], [1, 0, 0, 0, 0, 0]], dtype=torch.bool)
    expected = _reference(student, teacher, masks, loss_fn.center, tau_s, tau_t)
    assert math.isclose(loss_fn(student, teacher, masks, tau_t).item(), expected, rel_tol=1e-5)


def test_unmasked_patches_have_no_effect():
    torch.manual_seed(1)
    B, N, K = 2, 4, 3
    loss_fn = iBOTPatchLoss(out_dim=K)
    student, teacher = torch.randn(B, N, K), torch.randn(B, N, K)
    masks = torch.tensor([[1, 0, 1, 0], [0, 1, 0, 0]], dtype=torch.bool)
    base = loss_fn(student, teacher, masks, 0.07)
    student2, teacher2 = student.clone(), teacher.clone()
    student2[~masks] = torch.randn(int((~masks).sum()), K) * 10
    teacher2[~masks] = torch.randn(int((~masks).sum()), K) * 10
    assert torch.allclose(loss_fn(student2, teacher2, masks, 0.07), base)
    student2[0, 1] = float("inf")  # even non-finite values at unmasked patches are ignored
    assert torch.allclose(loss_fn(student2, teacher2, masks, 0.07), base)


def test_gradients_reach_masked_student_patches_only():
    torch.manual_seed(2)
    student = torch.randn(2, 3, 4, requires_grad=True)
    teacher = torch.randn(2, 3, 4, requires_grad=True)
    masks = torch.tensor([[True, False, True], [False, False, True]])
    iBOTPatchLoss(out_dim=4)(student, teacher, masks, 0.05).backward()
    assert teacher.grad is None
    assert torch.all(student.grad[~masks] == 0)
    assert torch.all(student.grad[masks].abs().sum(-1) > 0)


def test_center_update_is_ema_of_mean_over_all_patches():
    loss_fn = iBOTPatchLoss(out_dim=2, center_momentum=0.9)
    assert loss_fn.center.shape == (1, 1, 2)
    # mean over the 2 x 2 patches = [1, 0.5]
    teacher = torch.tensor([[[4.0, 0.0], [0.0, 0.0]], [[0.0, 2.0], [0.0, 0.0]]])
    loss_fn.update_center(teacher)
    assert torch.allclose(loss_fn.center, torch.tensor([[[0.1, 0.05]]]))
    loss_fn.update_center(teacher)
    assert torch.allclose(loss_fn.center, torch.tensor([[[0.9 * 0.1 + 0.1, 0.9 * 0.05 + 0.05]]]))


def test_shape_mismatch_raises():
    loss_fn = iBOTPatchLoss(out_dim=3)
    with pytest.raises(ValueError, match="shape"):
        loss_fn(torch.zeros(2, 4, 3), torch.zeros(2, 4, 3), torch.zeros(2, 5, dtype=torch.bool), 0.1)


def test_masked_patch_cross_entropy_matches_direct_computation():
    torch.manual_seed(3)
    M, K, B, tau_s = 5, 4, 3, 0.1
    student = torch.randn(M, K)
    teacher_probs = torch.softmax(torch.randn(M, K), dim=-1)
    weights = torch.tensor([0.5, 0.5, 1 / 3, 1 / 3, 1 / 3])
    expected = 0.0
    for m in range(M):
        logq = F.log_softmax(student[m] / tau_s, dim=-1)
        expected += -weights[m].item() * (teacher_probs[m] * logq).sum().item()
    expected /= B
    got = masked_patch_cross_entropy(student, teacher_probs, weights, tau_s, n_images=B)
    assert math.isclose(got.item(), expected, rel_tol=1e-5)


def test_masked_patch_cross_entropy_equals_full_loss_on_gathered_tokens():
    # DINOv2's masked-only path == the dense iBOT loss with the same (centered softmax) teacher probabilities.
    torch.manual_seed(4)
    B, N, K, tau_s, tau_t = 4, 6, 5, 0.1, 0.07
    loss_fn = iBOTPatchLoss(out_dim=K, student_temp=tau_s)
    student, teacher = torch.randn(B, N, K), torch.randn(B, N, K)
    masks = torch.zeros(B, N, dtype=torch.bool)
    masks[0, :3] = True
    masks[2, 1] = True
    masks[3] = True
    weights = (1 / masks.sum(-1).clamp(min=1)).unsqueeze(-1).expand_as(masks)[masks]  # DINOv2's collate
    probs = torch.softmax(teacher[masks] / tau_t, dim=-1)
    got = masked_patch_cross_entropy(student[masks], probs, weights, tau_s, n_images=B)
    assert torch.allclose(got, loss_fn(student, teacher, masks, tau_t), rtol=1e-5)
    with pytest.raises(ValueError):
        masked_patch_cross_entropy(student[masks], probs, weights, tau_s, n_images=0)
