import pytest
import timm
import torch

from vfm.backbones import Backbone, load_exported


def _vit(**kw):
    return Backbone("vit_tiny_patch16_224", img_size=28, patch_size=7, in_chans=1,
                    model_kwargs={"depth": 2, "embed_dim": 64, "num_heads": 2}, **kw)


def test_vit_contract_and_multires():
    b = _vit(mask_token=True)
    assert (b.embed_dim, b.patch_size, b.num_prefix_tokens, b.has_patch_tokens) == (64, 7, 1, True)
    x = torch.randn(3, 1, 28, 28)
    out = b.forward_tokens(x)
    assert out["global"].shape == (3, 64) and out["patch"].shape == (3, 16, 64)
    assert torch.equal(out["global"], b(x))
    assert b(torch.randn(2, 1, 14, 14)).shape == (2, 64)  # local crops: interpolated position embedding


def test_mask_token_replaces_masked_patches():
    b = _vit(mask_token=True).eval()
    x = torch.randn(2, 1, 28, 28)
    mask = torch.zeros(2, 16, dtype=torch.bool)
    mask[0, :8] = True
    a, m = b.forward_tokens(x)["patch"], b.forward_tokens(x, mask=mask)["patch"]
    assert torch.allclose(a[1], m[1], atol=1e-6) and not torch.allclose(a[0], m[0])
    with pytest.raises(ValueError, match="mask_token=True"):
        _vit().forward_tokens(x, mask=mask)


def test_export_loads_into_plain_timm(tmp_path):
    b = _vit().eval()
    path = b.export(tmp_path / "enc.safetensors")
    plain = load_exported(path).eval()
    assert type(plain) is type(b.model)
    x = torch.randn(2, 1, 28, 28)
    assert torch.allclose(plain(x), b(x), atol=1e-5)  # timm uses fused attention, ours plain ops on CPU
    # and by hand with timm.create_model + safetensors
    from safetensors.torch import load_file

    m = timm.create_model("vit_tiny_patch16_224", num_classes=0, img_size=28, patch_size=7, in_chans=1,
                          depth=2, embed_dim=64, num_heads=2, dynamic_img_size=True).eval()
    m.load_state_dict(load_file(str(path)))
    assert torch.allclose(m(x), b(x), atol=1e-5)


def test_resnet_has_no_patch_tokens():
    r = Backbone("resnet18", in_chans=1)
    assert not r.has_patch_tokens and r.patch_size is None and r(torch.randn(2, 1, 32, 32)).shape == (2, 512)
    with pytest.raises(ValueError, match="no patch tokens"):
        r.forward_tokens(torch.randn(1, 1, 32, 32))


def test_unknown_model_name():
    with pytest.raises(ValueError, match="unknown timm model"):
        Backbone("vit_does_not_exist")


def test_register_tokens_and_layerscale_pass_through_to_timm():
    b = Backbone("vit_tiny_patch16_224", img_size=28, patch_size=7, in_chans=1, mask_token=True,
                 model_kwargs={"depth": 2, "embed_dim": 32, "num_heads": 2, "reg_tokens": 4, "init_values": 1e-5})
    assert b.num_prefix_tokens == 5  # [CLS] + 4 registers
    out = b.forward_tokens(torch.randn(2, 1, 28, 28), mask=torch.ones(2, 16, dtype=torch.bool))
    assert out["patch"].shape == (2, 16, 32) and out["prefix"].shape == (2, 5, 32)
    assert any("ls1" in n for n, _ in b.named_parameters())


def test_grad_checkpointing_gives_the_same_gradients():
    from vfm.backbones import Backbone

    kw = dict(img_size=28, patch_size=7, in_chans=1, drop_path_rate=0.2, mask_token=True,
              model_kwargs=dict(depth=2, embed_dim=32, num_heads=2))
    torch.manual_seed(0)
    plain = Backbone("vit_tiny_patch16_224", **kw)
    ckpt = Backbone("vit_tiny_patch16_224", grad_checkpointing=True, **kw)
    ckpt.load_state_dict(plain.state_dict())
    x = torch.randn(4, 1, 28, 28)
    mask = torch.rand(4, 16) < 0.3
    ids_keep = torch.argsort(torch.rand(4, 16), dim=1)[:, :4]
    for run in (lambda b: b.forward_tokens(x, mask)["patch"], lambda b: b.forward_visible(x, ids_keep)["tokens"],
                lambda b: b(x)):
        grads = []
        for b in (plain, ckpt):
            b.zero_grad()
            torch.manual_seed(1)  # the same drop-path draws; a recomputed block must redraw them identically
            run(b).square().mean().backward()
            grads.append([p.grad.clone() for p in b.parameters() if p.grad is not None])
        assert len(grads[0]) == len(grads[1]) > 0
        for a, b in zip(*grads):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_a_third_party_state_dict_pt_loads_as_the_named_backbone(tmp_path):
    """`evaluate checkpoint=f.pt backbone=vit_tiny` on a plain timm `state_dict()` saved with
    torch.save: the file carries no architecture, the named backbone is it (as for .safetensors)."""
    from conftest import compose_cfg
    from vfm.config import ConfigError
    from vfm.evaluate import load_encoder

    third_party = timm.create_model("vit_tiny_patch16_224", img_size=32)  # with its classifier head
    torch.save(third_party.state_dict(), tmp_path / "f.pt")
    data = ["dataset=synthetic", "dataset.img_size=32", "dataset.in_chans=3", "backbone.patch_size=16"]
    cfg = compose_cfg([f"checkpoint={tmp_path / 'f.pt'}", "backbone=vit_tiny", *data], config_name="evaluate")
    encoder, _ = load_encoder(cfg.checkpoint, cfg.backbone)
    expected = third_party.state_dict()
    loaded = encoder.model.state_dict()
    assert loaded and all(torch.equal(v, expected[k]) for k, v in loaded.items())
    x = torch.randn(2, 3, 32, 32)
    assert torch.allclose(encoder(x), third_party.forward_head(third_party.forward_features(x), pre_logits=True), atol=1e-5)

    other = compose_cfg([f"checkpoint={tmp_path / 'f.pt'}", "backbone=vit_small", *data], config_name="evaluate")
    with pytest.raises(ConfigError, match=r"checkpoint=.*f\.pt does not match timm model vit_small_patch16_224"):
        load_encoder(other.checkpoint, other.backbone)
