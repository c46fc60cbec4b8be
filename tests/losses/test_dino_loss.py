import math

import torch
import torch.nn.functional as F

from vfm.losses.dino_loss import DINOLoss


def test_single_pair_by_hand():
    # teacher [1, 0] at T=1 -> p = (e, 1) / (e + 1); student [0, 0] -> log p_s = -ln 2 on both classes
    loss_fn = DINOLoss(out_dim=2, student_temp=0.1)
    s = [torch.tensor([[5.0, -3.0]]), torch.tensor([[0.0, 0.0]])]  # view 0 is the teacher's own view: skipped
    t = [torch.tensor([[1.0, 0.0]])]
    assert math.isclose(loss_fn(s, t, teacher_temp=1.0).item(), math.log(2), rel_tol=1e-6)


def test_matches_formula_with_center_and_temperatures():
    torch.manual_seed(0)
    B, K, tau_s, tau_t = 3, 5, 0.1, 0.04
    loss_fn = DINOLoss(out_dim=K, student_temp=tau_s)
    loss_fn.center.copy_(torch.randn(1, K))
    student = [torch.randn(B, K) for _ in range(4)]  # 2 global + 2 local
    teacher = [torch.randn(B, K) for _ in range(2)]
    expected, n = 0.0, 0
    for it in range(2):
        p = torch.softmax((teacher[it] - loss_fn.center) / tau_t, dim=-1)
        for iv in range(4):
            if iv == it:
                continue
            logq = F.log_softmax(student[iv] / tau_s, dim=-1)
            expected += sum(-(p[b] * logq[b]).sum().item() for b in range(B)) / B
            n += 1
    assert n == 6
    assert math.isclose(loss_fn(student, teacher, tau_t).item(), expected / n, rel_tol=1e-5)


def test_center_update_is_ema_of_batch_mean():
    loss_fn = DINOLoss(out_dim=2, center_momentum=0.9)
    loss_fn.update_center(torch.tensor([[1.0, 0.0], [0.0, 0.0]]))
    assert torch.allclose(loss_fn.center, torch.tensor([[0.05, 0.0]]))
    loss_fn.update_center(torch.tensor([[1.0, 0.0], [0.0, 0.0]]))
    assert torch.allclose(loss_fn.center, torch.tensor([[0.9 * 0.05 + 0.05, 0.0]]))


def test_sharpening_lowers_teacher_entropy():
    t = torch.tensor([[1.0, 0.5, 0.0]])
    ent = lambda p: -(p * p.log()).sum()  # noqa: E731
    assert ent(torch.softmax(t / 0.04, -1)) < ent(torch.softmax(t / 1.0, -1))
