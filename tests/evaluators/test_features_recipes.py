"""Feature recipes: which tokens of a frozen ViT the linear probe reads, one forward for all of
them, a cache file per recipe, and the fallback of encoders without a [CLS] token."""

from __future__ import annotations

import logging
import os
from types import SimpleNamespace

import pytest
import torch

from vfm.backbones import Backbone
from vfm.evaluators.features import (
    GLOBAL,
    RECIPES,
    extract_split_features,
    extract_split_recipes,
    last_blocks,
    recipe_cache_path,
)
from vfm.evaluators.knn import KNN
from vfm.evaluators.linear import LinearProbe
from vfm.evaluators.recipes import extraction_plan
from vfm.evaluators.suite import run_evaluators

MEAN, STD = (0.5,), (0.25,)


def tiny_vit(depth: int = 5) -> Backbone:
    torch.manual_seed(0)
    return Backbone("vit_tiny_patch16_224", img_size=8, patch_size=4, in_chans=1,
                    model_kwargs=dict(depth=depth, embed_dim=16, num_heads=2)).eval()


class Split:
    def __init__(self, n: int, seed: int) -> None:
        g = torch.Generator().manual_seed(seed)
        self.images = torch.randint(0, 256, (n, 1, 8, 8), generator=g, dtype=torch.uint8)
        self.labels = torch.randint(0, 3, (n,), generator=g)

    def __len__(self) -> int:
        return len(self.images)


def splits(n_train: int = 40) -> SimpleNamespace:
    return SimpleNamespace(train=Split(n_train, 0), val=Split(12, 1), test=Split(12, 2), mean=MEAN, std=STD,
                           num_classes=3)


def block_outputs(vit: Backbone, x: torch.Tensor) -> list[torch.Tensor]:
    """Every block's output after the final norm, by running the blocks one by one (DINO's
    get_intermediate_layers loop), independently of timm's forward_intermediates."""
    m = vit.model
    t = m.norm_pre(m.patch_drop(m._pos_embed(m.patch_embed(x))))
    outs = []
    for blk in m.blocks:
        t = blk(t)
        outs.append(m.norm(t))
    return outs


def test_last_blocks_are_normed_block_outputs_and_global_is_the_forward() -> None:
    vit, x = tiny_vit(), torch.randn(3, 1, 8, 8)
    with torch.no_grad():
        glob, blocks = last_blocks(vit, x, 4)
        outs = block_outputs(vit, x)
        assert torch.equal(glob, vit(x))
    assert len(blocks) == 4
    for (prefix, patch), ref in zip(blocks, outs[-4:], strict=True):
        torch.testing.assert_close(prefix, ref[:, :1])
        torch.testing.assert_close(patch, ref[:, 1:])


def test_every_recipe_from_one_pass_and_cls_is_the_global_feature() -> None:
    vit, data = tiny_vit(), splits()
    f = extract_split_recipes(vit, data, (GLOBAL, *RECIPES), progress=False)
    x = (data.train.images.float() / 255 - 0.5) / 0.25
    with torch.no_grad():
        outs = block_outputs(vit, x)
    cls = [o[:, 0] for o in outs]
    torch.testing.assert_close(f["last4_cls"].train_x, torch.cat(cls[-4:], 1))
    torch.testing.assert_close(f["cls_avgpool"].train_x, torch.cat([cls[-1], outs[-1][:, 1:].mean(1)], 1))
    torch.testing.assert_close(f["last4_cls_avgpool"].train_x, torch.cat([*cls[-4:], outs[-1][:, 1:].mean(1)], 1))
    # the final-norm [CLS] is the encoder's own output: bitwise, so `cls` probes give the same numbers
    assert torch.equal(f["cls"].train_x, f[GLOBAL].train_x)
    assert {r: f[r].recipe for r in f} == {r: r for r in f}
    assert torch.equal(f["last4_cls"].test_y, data.test.labels)


def test_encoders_without_cls_fall_back_to_the_global_feature(caplog: pytest.LogCaptureFixture) -> None:
    cnn = Backbone("resnet18", in_chans=1).eval()
    with caplog.at_level(logging.INFO, logger="vfm.evaluators.recipes"):
        f = extract_split_recipes(cnn, splits(8), ("last4_cls", GLOBAL), progress=False, batch_size=4)
    assert "has none: using its pooled global feature" in caplog.text
    assert f["last4_cls"] is f[GLOBAL] and f["last4_cls"].recipe == GLOBAL
    # a ViT shallower than the recipe: the last block only, said so
    assert extraction_plan(tiny_vit(depth=2), ["last4_cls", "last4_cls_avgpool"]) == {
        "last4_cls": "cls", "last4_cls_avgpool": "cls_avgpool"}
    with pytest.raises(ValueError, match="unknown feature recipe"):
        extraction_plan(tiny_vit(), ["last5_cls"])


def test_a_cache_file_per_recipe(tmp_path: os.PathLike, monkeypatch: pytest.MonkeyPatch) -> None:
    vit, data, path = tiny_vit(), splits(), tmp_path / "feats.pt"
    first = extract_split_recipes(vit, data, (GLOBAL, "last4_cls"), cache_path=path, cache_key="k", progress=False)
    assert sorted(os.listdir(tmp_path)) == ["feats.last4_cls.pt", "feats.pt"]
    assert recipe_cache_path(path, "last4_cls") == tmp_path / "feats.last4_cls.pt"
    forwards = []
    monkeypatch.setattr(vit.model, "forward_intermediates", lambda *a, **k: forwards.append(1))
    again = extract_split_recipes(vit, data, ("last4_cls", GLOBAL), cache_path=path, cache_key="k", progress=False)
    assert not forwards  # both loaded
    assert torch.equal(again["last4_cls"].val_x, first["last4_cls"].val_x) and again["last4_cls"].recipe == "last4_cls"
    # the global cache is the one extract_split_features reads and writes
    assert torch.equal(extract_split_features(vit, data, cache_path=path, cache_key="k", progress=False).train_x,
                       first[GLOBAL].train_x)


def test_suite_gives_knn_the_global_feature_and_the_probe_its_recipe() -> None:
    vit, data = tiny_vit(), splits()
    evaluators = {"knn": KNN(k=3), "linear": LinearProbe(paper="dino", epochs=2, lrs=(0.1,))}
    m = run_evaluators(vit, data, evaluators, progress=False, distributed=False)
    assert m["linear/n_last_blocks"] == 4 and m["linear/avgpool"] == 0
    ref = KNN(k=3)(extract_split_features(vit, data, progress=False), 3)
    assert m["knn/top1"] == ref["knn/top1"]
