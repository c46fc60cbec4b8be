"""The BEiT tokenizer, BEiT and EVA: codes, file formats, targets and the grid checks."""


import pytest
import torch
from torch import nn

from conftest import compose_cfg, tiny_method_overrides
from vfm.backbones import Backbone
from vfm.backbones.loading import EncoderLoadError, load_pretrained_encoder
from vfm.config import ConfigError
from vfm.data.masking import sample_masks
from vfm.heads.tokenizer import Tokenizer, load_tokenizer
from vfm.methods.beit import BEiT
from vfm.methods.eva import EVA
from vfm.methods.vq_tokenizer import VQTokenizer
from vfm.pretrain import build_method

KW = dict(img_size=28, patch_size=7, in_chans=1, model_kwargs=dict(depth=1, embed_dim=24, num_heads=2))


def _bb(**kw) -> Backbone:
    return Backbone("vit_tiny_patch16_224", **{**KW, **kw})


def test_tokenizer_codes_are_stable_and_survive_save_and_load(tmp_path):
    torch.manual_seed(0)
    tok = Tokenizer(_bb(), num_codes=16, code_dim=8)
    x = torch.randn(4, 1, 28, 28)
    tok.train()
    _, codes_train, _, stats = tok.quantize(x)  # first training call: k-means init
    assert codes_train.shape == (4, 16) and 0 < stats["code_usage"] <= 1
    tok.eval()
    a, b = tok(x), tok(x)
    assert torch.equal(a, b) and a.dtype == torch.long and int(a.max()) < 16
    loaded = load_tokenizer(tok.save(tmp_path / "tokenizer.pt"))
    assert torch.equal(loaded(x), a)
    assert loaded.num_codes == 16 and not any(p.requires_grad for p in loaded.parameters())
    assert torch.equal(load_tokenizer(tmp_path)(x), a)  # a run directory works too


def test_codebook_report_counts_codes_in_use(mim_artifacts):
    torch.manual_seed(0)
    m = VQTokenizer(_bb(), target="pixels", num_codes=16, code_dim=8, decoder_dim=16, decoder_depth=1, decoder_heads=2)
    m.eval()
    x = torch.randn(32, 1, 28, 28)
    codes = m.tokenizer(x)
    report = m.codebook_report(x, batch_size=7)
    assert report["tokenizer/code_usage"] == pytest.approx(codes.unique().numel() / 16)
    p = torch.bincount(codes.flatten(), minlength=16).double() / codes.numel()
    assert report["tokenizer/perplexity"] == pytest.approx(float(torch.exp(-(p[p > 0] * p[p > 0].log()).sum())))


def test_vqkd_reconstructs_the_teacher_features(mim_artifacts):
    torch.manual_seed(0)
    m = VQTokenizer(_bb(), target="features", teacher=str(mim_artifacts["teacher"]), teacher_normalize="dataset",
                    num_codes=16, code_dim=8, decoder_dim=16, decoder_depth=1, decoder_heads=2)
    out = m.training_step({"crops": [torch.randn(4, 1, 28, 28)]}, 0, {})
    assert 0 <= out["loss_rec"] <= 2 and {"perplexity", "code_usage", "dead_codes"} <= set(out)
    out["loss"].backward()
    assert m.tokenizer.backbone.model.blocks[0].attn.qkv.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in m.teacher.parameters())


class _FakeDallE(nn.Module):
    """Stands in for DALL-E's encoder.pkl: RGB in [0.1, 0.9] at 8 px per code -> logits [B, K, h, w]."""

    vocab_size = 8

    def forward(self, x):
        assert x.shape[1] == 3 and x.min() >= 0.1 - 1e-6 and x.max() <= 0.9 + 1e-6
        pooled = nn.functional.avg_pool2d(x.mean(1, keepdim=True), 8)  # [B, 1, h, w]
        centers = torch.linspace(0.1, 0.9, self.vocab_size).reshape(1, -1, 1, 1)
        return -(pooled - centers).abs()


def test_a_pickled_dalle_style_encoder_is_a_tokenizer(tmp_path, monkeypatch):
    torch.save(_FakeDallE(), tmp_path / "encoder.pkl")
    monkeypatch.delenv("VFM_TRUST_CHECKPOINTS", raising=False)
    with pytest.raises(ValueError, match=r"encoder\.pkl.*_FakeDallE.*VFM_TRUST_CHECKPOINTS=1"):  # a pickled module is code
        load_tokenizer(tmp_path / "encoder.pkl", mean=[0.5], std=[0.25], patch_size=7)
    monkeypatch.setenv("VFM_TRUST_CHECKPOINTS", "1")
    tok = load_tokenizer(tmp_path / "encoder.pkl", mean=[0.5], std=[0.25], patch_size=7)
    codes = tok(torch.zeros(2, 1, 28, 28))  # normalised 0 = pixel 0.5 -> the middle code
    assert codes.shape == (2, 16) and tok.num_codes == 8
    assert set(codes.flatten().tolist()) <= {3, 4}


def test_beit_predicts_codes_of_masked_patches(mim_artifacts):
    torch.manual_seed(0)
    m = BEiT(_bb(), tokenizer=str(mim_artifacts["tokenizer"]))
    x = torch.randn(4, 1, 28, 28)
    mask = sample_masks(4, 4, ratio_range=(0.4, 0.4), mask_probability=1.0, generator=torch.Generator().manual_seed(0),
                        min_num_patches=1)
    out = m.training_step({"crops": [x], "masks": [mask]}, 0, {})
    assert out["loss"].item() > 0 and 0 <= out["mim_acc"] <= 1
    assert m.head.out_features == 16 and m.encoder is m.backbone
    out["loss"].backward()
    assert m.backbone.mask_token.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="backbone.patch_size=7"):
        BEiT(_bb(patch_size=4), tokenizer=str(mim_artifacts["tokenizer"]))


def test_eva_targets_are_the_teacher_patch_features(mim_artifacts):
    torch.manual_seed(0)
    student = Backbone("vit_tiny_patch16_224", img_size=28, patch_size=7, in_chans=1,
                       model_kwargs=dict(depth=1, embed_dim=32, num_heads=2))  # wider than the 24-d teacher
    m = EVA(student, teacher=str(mim_artifacts["teacher"]), teacher_normalize="dataset")  # a 1-channel teacher
    x = torch.randn(3, 1, 28, 28)
    target = m.teacher.encoder.forward_tokens(x)["patch"]
    pred = m.head(m.backbone.forward_tokens(x)["patch"])
    assert target.shape == pred.shape == (3, 16, 24)
    mask = sample_masks(3, 4, ratio_range=(0.4, 0.4), mask_probability=1.0, generator=torch.Generator().manual_seed(0),
                        min_num_patches=1)
    out = m.training_step({"crops": [x], "masks": [mask]}, 0, {})
    assert 0 <= out["loss"].item() <= 2
    out["loss"].backward()
    assert all(p.grad is None for p in m.teacher.parameters())


def test_eva_teacher_grid_mismatch_is_a_config_error(mim_artifacts):
    cfg = compose_cfg(tiny_method_overrides("eva", mim_artifacts) + ["backbone.patch_size=4"])
    with pytest.raises(ConfigError, match=r"teacher .* 7 px patches but the student has 4.*backbone\.patch_size=7"):
        build_method(cfg)


def test_load_pretrained_encoder_sources(mim_artifacts, tmp_path):
    x = torch.randn(2, 1, 28, 28)
    exported = load_pretrained_encoder(mim_artifacts["teacher"])
    ref = exported(x)
    # a foreign state dict (plain timm keys, no metadata) needs the timm model name
    torch.save(exported.model.state_dict(), tmp_path / "weights.pth")
    with pytest.raises(EncoderLoadError, match="name the timm model"):
        load_pretrained_encoder(tmp_path / "weights.pth")
    foreign = load_pretrained_encoder(tmp_path / "weights.pth", model_name="vit_tiny_patch16_224",
                                      model_kwargs=dict(KW["model_kwargs"], img_size=28, patch_size=7, in_chans=1))
    assert torch.allclose(foreign(x), ref, atol=1e-6)
    with pytest.raises(EncoderLoadError, match="do not exist"):
        load_pretrained_encoder(tmp_path / "nope.pt")
    with pytest.raises(EncoderLoadError, match="neither encoder.safetensors"):
        load_pretrained_encoder(tmp_path)
    run = tmp_path / "run"
    run.mkdir()
    (run / "encoder.safetensors").write_bytes(mim_artifacts["teacher"].read_bytes())
    assert torch.allclose(load_pretrained_encoder(run)(x), ref)  # a run directory: its exported encoder
