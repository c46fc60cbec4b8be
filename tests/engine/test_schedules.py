import math

import pytest
import torch

from vfm.engine.schedules import Constant, Cosine, StepUntil, WarmupConstant


def test_cosine_with_warmup_matches_formula():
    s = Cosine(base=1.0, final=0.1, warmup_epochs=1, warmup_start=0.0).build(steps_per_epoch=4, epochs=3)
    assert s.shape == (12,)
    assert torch.allclose(s[:4], torch.linspace(0, 1, 4, dtype=torch.float64))
    rest = 8
    for i in range(rest):
        expected = 0.1 + 0.5 * 0.9 * (1 + math.cos(math.pi * i / rest))
        assert math.isclose(s[4 + i].item(), expected, rel_tol=1e-12)
    assert s[4].item() == pytest.approx(1.0)


def test_ema_momentum_schedule_rises_to_one():
    s = Cosine(0.996, 1.0).build(10, 5)
    assert s[0].item() == pytest.approx(0.996) and s[-1].item() < 1.0 and s[-1].item() > 0.9999
    assert torch.all(s[1:] >= s[:-1])


def test_warmup_constant_and_step_until():
    t = WarmupConstant(start=0.04, value=0.07, warmup_epochs=2).build(3, 4)
    assert t[0].item() == pytest.approx(0.04) and t[5].item() == pytest.approx(0.07) and t[-1].item() == pytest.approx(0.07)
    f = StepUntil(before=1, after=0, epochs=1).build(3, 4)
    assert f.tolist() == [1, 1, 1] + [0] * 9
    assert Constant(2.0).build(2, 2).tolist() == [2.0] * 4


def test_warmup_longer_than_training_is_truncated():
    s = Cosine(1.0, 0.0, warmup_epochs=10).build(2, 3)
    assert s.shape == (6,) and torch.all(s[1:] > s[:-1]) and s.max().item() <= 1.0
