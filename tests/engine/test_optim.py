import pytest
import torch

from vfm.engine.optim import OptimSpec, clip_gradients, set_optimizer_values


def test_lr_scaling_rule():
    spec = OptimSpec(blr=5e-4)
    assert spec.peak_lr(1024) == pytest.approx(2e-3)
    assert "5e-04 * 1024 / 256" in spec.lr_rule(1024) or "0.0005 * 1024 / 256" in spec.lr_rule(1024)
    assert OptimSpec(lr=0.1).peak_lr(1024) == 0.1


def test_per_param_clipping_matches_dino_rule():
    a = torch.nn.Parameter(torch.zeros(2))
    b = torch.nn.Parameter(torch.zeros(2))
    a.grad = torch.tensor([3.0, 4.0])  # norm 5 -> clipped to 1
    b.grad = torch.tensor([0.3, 0.4])  # norm 0.5 -> untouched
    total = clip_gradients([a, b], 1.0, "per_param")
    assert torch.allclose(a.grad, torch.tensor([0.6, 0.8]), atol=1e-6)
    assert torch.allclose(b.grad, torch.tensor([0.3, 0.4]))
    assert total.item() == pytest.approx((25 + 0.25) ** 0.5)


def test_global_clipping():
    a = torch.nn.Parameter(torch.zeros(2))
    b = torch.nn.Parameter(torch.zeros(2))
    a.grad, b.grad = torch.tensor([3.0, 4.0]), torch.tensor([0.0, 0.0])
    clip_gradients([a, b], 1.0, "global")
    assert torch.linalg.vector_norm(torch.cat([a.grad, b.grad])).item() == pytest.approx(1.0, rel=1e-5)


def test_group_multipliers_apply():
    p1, p2 = torch.nn.Parameter(torch.zeros(2, 2)), torch.nn.Parameter(torch.zeros(2))
    opt = OptimSpec().build([{"params": [p1], "wd_mult": 1.0}, {"params": [p2], "wd_mult": 0.0, "lr_mult": 0.5}], "cpu")
    set_optimizer_values(opt, lr=1.0, wd=0.1)
    assert [g["lr"] for g in opt.param_groups] == [1.0, 0.5]
    assert [g["weight_decay"] for g in opt.param_groups] == [0.1, 0.0]


def test_bad_names_fail():
    with pytest.raises(ValueError, match="optim.name"):
        OptimSpec(name="lamb")
    with pytest.raises(ValueError, match="optim.clip_mode"):
        OptimSpec(clip_mode="x")


def test_sqrt_scaling_rule():
    spec = OptimSpec(blr=4e-3, lr_scaling="sqrt", lr_reference_batch=1024)
    assert spec.peak_lr(256) == pytest.approx(2e-3)
    assert "sqrt(256 / 1024)" in spec.lr_rule(256)
