import torch

from vfm.backbones import Backbone
from vfm.methods.base import ema_update
from vfm.methods.dino import DINO


def _dino(**kw):
    bb = Backbone("vit_tiny_patch16_224", img_size=28, patch_size=7, in_chans=1,
                  model_kwargs={"depth": 2, "embed_dim": 32, "num_heads": 2})
    return DINO(bb, out_dim=64, hidden_dim=32, bottleneck_dim=16, **kw)


def _batch(b=4):
    return {"crops": [torch.randn(b, 1, 28, 28) for _ in range(2)] + [torch.randn(b, 1, 14, 14) for _ in range(3)]}


SCHED = {"teacher_temp": 0.04, "teacher_momentum": 0.9, "freeze_last_layer": 0.0}


def test_teacher_starts_equal_and_is_not_trainable():
    m = _dino()
    for (n, ps), pt in zip(m.student.named_parameters(), m.teacher.parameters()):
        assert torch.equal(ps, pt), n
        assert not pt.requires_grad
    assert m.encoder is m.teacher.backbone


def test_training_step_grads_only_reach_student_and_center_moves():
    m = _dino()
    out = m.training_step(_batch(), 0, SCHED)
    assert out["loss"].ndim == 0 and torch.isfinite(out["loss"])
    out["loss"].backward()
    assert all(p.grad is None for p in m.teacher.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in m.student.backbone.parameters())
    assert m.loss_fn.center.abs().sum() > 0


def test_ema_update_formula():
    t, s = torch.nn.Linear(3, 2), torch.nn.Linear(3, 2)
    before = [p.clone() for p in t.parameters()]
    ema_update(t, s, 0.9)
    for b, pt, ps in zip(before, t.parameters(), s.parameters()):
        assert torch.allclose(pt, 0.9 * b + 0.1 * ps)


def test_last_layer_frozen_while_scheduled():
    m = _dino()
    m.training_step(_batch(), 0, SCHED)["loss"].backward()
    m.before_optimizer_step(0, {**SCHED, "freeze_last_layer": 1.0})
    assert m.student.head.last_layer_v.grad is None
    assert m.student.head.mlp[0].weight.grad is not None


def test_no_weight_decay_on_biases_and_norms():
    groups = {g["name"]: g for g in _dino().param_groups()}
    assert groups["no_decay"]["wd_mult"] == 0.0
    assert all(p.ndim <= 1 for p in groups["no_decay"]["params"])
    assert all(p.ndim > 1 for p in groups["decay"]["params"])


def test_norm_last_layer_rows_unit_norm():
    head = _dino().student.head
    w = head.last_layer_g * torch.nn.functional.normalize(head.last_layer_v, dim=1)
    assert torch.allclose(w.norm(dim=1), torch.ones(64), atol=1e-5)
    assert not head.last_layer_g.requires_grad
