import pytest
import torch

from vfm.backbones import Backbone
from vfm.backbones.layer_decay import layer_decay_param_groups
from vfm.methods.dinov2 import DINOv2
from vfm.methods.ibot import iBOT


def _backbone():
    return Backbone("vit_tiny_patch16_224", img_size=28, patch_size=7, in_chans=1,
                    model_kwargs={"depth": 2, "embed_dim": 32, "num_heads": 2})


def _batch(b=4):
    crops = [torch.randn(b, 1, 28, 28) for _ in range(2)] + [torch.randn(b, 1, 14, 14) for _ in range(2)]
    masks = [torch.zeros(b, 16, dtype=torch.bool) for _ in range(2)]
    masks[0][:2, :6] = True
    masks[1][1:3, 4:10] = True
    return {"crops": crops, "masks": masks}


SCHED = {"teacher_temp": 0.04, "teacher_patch_temp": 0.04, "teacher_momentum": 0.9, "freeze_last_layer": 0.0}


@pytest.mark.parametrize("make", [
    lambda: iBOT(_backbone(), out_dim=64, patch_out_dim=48, shared_head=False, hidden_dim=32, bottleneck_dim=16),
    lambda: iBOT(_backbone(), out_dim=64, shared_head=True, hidden_dim=32, bottleneck_dim=16),
    lambda: DINOv2(_backbone(), out_dim=64, patch_out_dim=48, hidden_dim=32, bottleneck_dim=16),
    lambda: DINOv2(_backbone(), out_dim=64, patch_out_dim=48, hidden_dim=32, bottleneck_dim=16, centering="sinkhorn_knopp"),
], ids=["ibot-separate", "ibot-shared", "dinov2-center", "dinov2-sinkhorn"])
def test_step_trains_student_and_mask_token_only(make):
    m = make()
    out = m.training_step(_batch(), 0, SCHED)
    assert torch.isfinite(out["loss"])
    out["loss"].backward()
    assert all(p.grad is None for p in m.teacher.parameters())
    assert m.student.backbone.mask_token.grad is not None and m.student.backbone.mask_token.grad.abs().sum() > 0
    m.on_step_end(0, SCHED)  # EMA runs over matching parameters
    assert m.encoder is m.teacher.backbone


def test_ibot_requires_masks():
    m = iBOT(_backbone(), out_dim=16, hidden_dim=16, bottleneck_dim=8)
    with pytest.raises(ValueError, match="method.masking"):
        m.training_step({"crops": _batch()["crops"]}, 0, SCHED)


def test_unmasked_batch_has_zero_ibot_loss():
    m = iBOT(_backbone(), out_dim=16, hidden_dim=16, bottleneck_dim=8)
    batch = _batch()
    batch["masks"] = [torch.zeros_like(x) for x in batch["masks"]]
    assert m.training_step(batch, 0, SCHED)["loss_patch"].item() == 0.0


def test_dinov2_layerwise_decay_and_patch_embed_multiplier():
    m = DINOv2(_backbone(), out_dim=16, patch_out_dim=16, hidden_dim=16, bottleneck_dim=8,
               layerwise_decay=0.5, patch_embed_lr_mult=0.2)
    layer_id = {n: g["layer_id"] for g in layer_decay_param_groups(m.student, layer_decay=0.5) for n in g["param_names"]}
    assert layer_id["backbone.model.blocks.1.attn.qkv.weight"] == 2
    assert layer_id["backbone.model.patch_embed.proj.weight"] == 0
    assert layer_id["dino_head.mlp.0.weight"] == 3
    mults = {}
    for g in m.param_groups():
        for p in g["params"]:
            mults[id(p)] = (g["lr_mult"], g["wd_mult"])
    named = dict(m.student.named_parameters())
    assert mults[id(named["backbone.model.blocks.1.attn.qkv.weight"])] == (0.5, 1.0)   # 0.5 ** (3 - 2)
    assert mults[id(named["backbone.model.blocks.0.attn.qkv.weight"])] == (0.25, 1.0)
    assert mults[id(named["backbone.model.patch_embed.proj.weight"])] == pytest.approx((0.125 * 0.2, 1.0))
    assert mults[id(named["backbone.model.blocks.0.norm1.weight"])][1] == 0.0
    assert mults[id(named["dino_head.mlp.0.weight"])] == (1.0, 1.0)
