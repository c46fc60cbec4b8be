import pytest
import torch
from torch import nn

from vfm.backbones import Backbone
from vfm.engine.optim import OptimSpec, clip_gradients, layer_decay_param_groups, set_optimizer_values


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


# ---------------------------------------------------------------------------------------------
# Layer-wise lr decay groups
# ---------------------------------------------------------------------------------------------


def tiny_vit(seed: int = 0) -> Backbone:
    torch.manual_seed(seed)
    return Backbone("vit_tiny_patch16_224", img_size=16, patch_size=4, in_chans=1,
                    model_kwargs=dict(depth=3, embed_dim=16, num_heads=2))


class Classifier(nn.Module):
    """An encoder with a linear head outside the timm model (as fine-tuning builds it)."""

    def __init__(self, encoder: nn.Module, dim: int, num_classes: int) -> None:
        super().__init__()
        self.encoder, self.head = encoder, nn.Linear(dim, num_classes)


def _by_name(groups: list[dict]) -> dict[str, dict]:
    out = {}
    for g in groups:
        for n in g["param_names"]:
            assert n not in out, f"{n} in two groups"
            out[n] = g
    return out


def _check_partition(model: nn.Module, groups: list[dict]) -> None:
    """Every trainable parameter in exactly one group, and the params match their names."""
    named = dict(model.named_parameters())
    seen = [id(p) for grp in groups for p in grp["params"]]
    assert sorted(seen) == sorted(id(p) for p in model.parameters() if p.requires_grad)
    for grp in groups:
        assert all(named[n] is p for n, p in zip(grp["param_names"], grp["params"], strict=True))
        assert set(grp) >= {"params", "param_names", "lr_mult", "wd_mult", "weight_decay", "layer_id", "name"}
        assert grp["name"] == f"layer_{grp['layer_id']}_{'decay' if grp['wd_mult'] else 'no_decay'}"


@pytest.mark.parametrize("where", ["backbone", "timm", "classifier"])
def test_layer_decay_lrs_and_weight_decay(where: str) -> None:
    enc = tiny_vit()
    model: nn.Module = {"backbone": enc, "timm": enc.model, "classifier": Classifier(enc, 16, 4)}[where]
    prefix = {"backbone": "model.", "timm": "", "classifier": "encoder.model."}[where]
    groups = layer_decay_param_groups(model, weight_decay=0.05, layer_decay=0.5)
    g = _by_name(groups)
    expected = {
        "patch_embed.proj.weight": 0.5**4, "cls_token": 0.5**4, "pos_embed": 0.5**4,
        "blocks.0.attn.qkv.weight": 0.5**3, "blocks.1.mlp.fc1.weight": 0.5**2, "blocks.2.norm1.weight": 0.5**1,
        "norm.weight": 1.0,
    }
    for name, lr in expected.items():
        assert g[prefix + name]["lr_mult"] == pytest.approx(lr), name
    assert g[prefix + "blocks.0.attn.qkv.weight"]["layer_id"] == 1 and g[prefix + "norm.bias"]["layer_id"] == 4
    # no weight decay: biases, norms, position embedding, [CLS]; decay: matrices
    for name in ("cls_token", "pos_embed", "patch_embed.proj.bias", "blocks.1.attn.qkv.bias",
                 "blocks.1.norm2.weight", "norm.weight", "norm.bias"):
        assert g[prefix + name]["weight_decay"] == 0.0 and g[prefix + name]["wd_mult"] == 0.0, name
    for name in ("patch_embed.proj.weight", "blocks.1.attn.qkv.weight", "blocks.2.mlp.fc2.weight"):
        assert g[prefix + name]["weight_decay"] == 0.05 and g[prefix + name]["wd_mult"] == 1.0, name
    if where == "classifier":
        assert g["head.weight"]["lr_mult"] == 1.0 and g["head.weight"]["weight_decay"] == 0.05
        assert g["head.bias"]["lr_mult"] == 1.0 and g["head.bias"]["weight_decay"] == 0.0
        assert g["head.weight"]["layer_id"] == 4
    _check_partition(model, groups)
    assert [(grp["layer_id"], grp["wd_mult"]) for grp in groups] == sorted(
        ((grp["layer_id"], grp["wd_mult"]) for grp in groups), key=lambda k: (k[0], -k[1]))
    if where == "backbone":  # the Backbone's mask token sits outside the timm model: an embedding
        enc.enable_mask_token()
        g = _by_name(layer_decay_param_groups(enc, weight_decay=0.05, layer_decay=0.5))
        assert g["mask_token"]["layer_id"] == 0 and g["mask_token"]["weight_decay"] == 0.0


def test_layer_decay_skips_frozen_and_takes_patterns() -> None:
    enc = tiny_vit()
    enc.use_fixed_sincos_pos_embed()  # frozen pos_embed: not handed to the optimizer
    groups = layer_decay_param_groups(enc, layer_decay=0.5)
    names = {n for g in groups for n in g["param_names"]}
    assert "model.pos_embed" not in names and "model.cls_token" in names
    assert all("weight_decay" not in g for g in groups)  # no fixed value asked for: the schedule sets it
    # fnmatch patterns on the full name (DINOv2: no decay for anything named *norm*, tokens decay)
    g = _by_name(layer_decay_param_groups(tiny_vit(), layer_decay=0.5, no_weight_decay=("*qkv*",)))
    assert g["model.blocks.0.attn.qkv.weight"]["wd_mult"] == 0.0 and g["model.cls_token"]["wd_mult"] == 1.0


def test_layer_decay_resnet_by_timm_group_matcher() -> None:
    """CNNs get layer decay from timm's group matcher: the stem is layer 0, each residual block of
    each stage one layer (resnet18: 4 stages x 2 blocks), a head outside the timm model the top."""
    model = Classifier(Backbone("resnet18", in_chans=1), 512, 4)
    groups = layer_decay_param_groups(model, weight_decay=0.1, layer_decay=0.5)
    _check_partition(model, groups)
    g = _by_name(groups)
    layer = {"encoder.model.conv1.weight": 0, "encoder.model.bn1.weight": 0, "encoder.model.layer1.0.conv1.weight": 1,
             "encoder.model.layer1.1.bn2.bias": 2, "encoder.model.layer2.0.downsample.0.weight": 3,
             "encoder.model.layer4.1.conv2.weight": 8, "head.weight": 9, "head.bias": 9}
    for name, lid in layer.items():
        assert g[name]["layer_id"] == lid and g[name]["lr_mult"] == 0.5 ** (9 - lid), name
    assert g["encoder.model.conv1.weight"]["wd_mult"] == 1.0 and g["encoder.model.bn1.weight"]["wd_mult"] == 0.0
    assert len({grp["layer_id"] for grp in groups}) == 10


def test_layer_decay_groups_drive_the_optimizer() -> None:
    """The groups are the trainer's format: `set_optimizer_values` scales lr and weight decay."""
    groups = layer_decay_param_groups(tiny_vit(), layer_decay=0.5)
    opt = OptimSpec().build(groups, "cpu")
    set_optimizer_values(opt, lr=2.0, wd=0.1)
    for grp in opt.param_groups:
        assert grp["lr"] == 2.0 * 0.5 ** (4 - grp["layer_id"])
        assert grp["weight_decay"] == 0.1 * grp["wd_mult"]
    assert {grp["wd_mult"] for grp in opt.param_groups} == {0.0, 1.0}


def test_layer_decay_without_timm_model_is_one_layer() -> None:
    model = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4))
    groups = layer_decay_param_groups(model, layer_decay=0.5)
    assert [(g["name"], g["lr_mult"], g["wd_mult"]) for g in groups] == [("layer_0_decay", 1.0, 1.0), ("layer_0_no_decay", 1.0, 0.0)]
