"""Attention Jaccard: the true mask as attention gives 1, DINO's 60%-mass threshold, ignored pixels,
the evaluator on a tiny ViT, and a clear error for encoders without attention."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf
from torch import nn

from vfm.backbones import Backbone
from vfm.data.datasets.segmentation import (
    IGNORE_INDEX,
    SegmentationSplits,
    TensorSegmentationDataset,
    synthetic_shapes,
)
from vfm.evaluators.attention_jaccard import AttentionJaccard, attention_jaccard
from vfm.evaluators.dense_features import DenseInputs
from vfm.evaluators.suite import run_evaluators

CONF = Path(__file__).resolve().parents[2] / "conf"


def square_mask() -> torch.Tensor:
    """[1, 8, 8]: on a 4x4 grid of 2x2-pixel patches, the top-left 2x2 patches are the object."""
    mask = torch.zeros(1, 8, 8, dtype=torch.uint8)
    mask[:, :4, :4] = 3
    return mask


def test_true_mask_as_attention_gives_one() -> None:
    mask = square_mask()  # foreground = 4 of the 16 patches of a 4x4 grid (2x2 pixels each)
    maps = (mask[:, None, ::2, ::2] > 0).float().repeat(1, 2, 1, 1)  # two heads, both = the mask
    jac, has_fg = attention_jaccard(maps, mask, threshold=1.0)
    assert jac.tolist() == [[1.0, 1.0]] and has_fg.tolist() == [True]


def test_sixty_percent_of_the_mass() -> None:
    """Head 0: two patches of 0.5 on the object are both needed for 60%: 2 of its 4 patches kept.
    Head 1: a patch of 0.7 on the object alone holds >= 60%, so only it is kept: Jaccard 1/4."""
    mask = square_mask()
    maps = torch.zeros(1, 2, 4, 4)
    maps[0, 0, 0, 0] = maps[0, 0, 1, 1] = 0.5
    maps[0, 1, 0, 0], maps[0, 1, 3, 3] = 0.7, 0.3
    jac, _ = attention_jaccard(maps, mask, threshold=0.6)
    assert jac[0, 0] == pytest.approx(0.5)  # 2 of the 4 object patches kept
    assert jac[0, 1] == pytest.approx(1 / 4)
    maps[0, 0, 0, 1] = maps[0, 0, 1, 0] = 0.5  # now four equal patches: 60% needs three of them
    jac, _ = attention_jaccard(maps, mask, threshold=0.6)
    assert jac[0, 0] == pytest.approx(3 / 4)


def test_ignored_pixels_are_left_out() -> None:
    mask = square_mask()
    mask[:, 4:, 4:] = IGNORE_INDEX
    maps = torch.zeros(1, 1, 4, 4)
    maps[0, 0, :2, :2] = 0.2
    maps[0, 0, 2:, 2:] = 0.05  # kept at threshold 1, but on ignored pixels only
    jac, _ = attention_jaccard(maps, mask, threshold=1.0)
    assert jac.item() == pytest.approx(1.0)


def tiny_vit() -> Backbone:
    torch.manual_seed(0)
    return Backbone("vit_tiny_patch16_224", img_size=32, patch_size=8, in_chans=3,
                    model_kwargs={"depth": 1, "embed_dim": 32, "num_heads": 2})


def test_evaluator_on_a_tiny_vit() -> None:
    splits = synthetic_shapes(n_train=4, n_val=4, n_test=12)
    m = run_evaluators(tiny_vit(), splits, {"attention_jaccard": AttentionJaccard()}, batch_size=8, progress=False)
    keys = {"best_head", "mean_head", "single_head", "single_head_index"}
    assert set(m) == {f"attention_jaccard/{k}" for k in keys} | {f"attention_jaccard/val_{k}" for k in keys}
    assert m["attention_jaccard/single_head_index"] == m["attention_jaccard/val_single_head_index"] in (0.0, 1.0)


def test_scores_of_the_val_split_are_named_val() -> None:
    """Without a test split (pretraining's periodic evaluation) the val scores must not pass for
    test ones, and are those of the val split in a full evaluation."""
    splits = synthetic_shapes(n_train=4, n_val=12, n_test=12)
    both = run_evaluators(tiny_vit(), splits, {"attention_jaccard": AttentionJaccard()}, batch_size=8, progress=False)
    splits.test = None
    val = run_evaluators(tiny_vit(), splits, {"attention_jaccard": AttentionJaccard()}, batch_size=8, progress=False)
    assert val == {k: v for k, v in both.items() if k.startswith("attention_jaccard/val_")} and len(val) == 4


def two_head_split(heads_right: list[tuple[bool, bool]]) -> TensorSegmentationDataset:
    """8x8 images whose foreground is the top half; channel h is where head h attends (see
    ``channel_attention``): the foreground when the head is right, the background when it is wrong
    (Jaccard 1 or 0)."""
    n = len(heads_right)
    masks = torch.zeros(n, 8, 8, dtype=torch.uint8)
    masks[:, :4] = 1
    images = torch.zeros(n, 3, 8, 8, dtype=torch.uint8)
    for i, right in enumerate(heads_right):
        for h, ok in enumerate(right):
            images[i, h] = 255 * (masks[i] == int(ok))
    return TensorSegmentationDataset(images, torch.zeros(n, dtype=torch.int64), masks)


def channel_attention(encoder: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return (x[:, :2] > 0).float()  # two heads; normalised pixels of 255 are > 0, of 0 are < 0


@pytest.fixture
def fixed_attention(monkeypatch: pytest.MonkeyPatch):
    import vfm.evaluators.attention_jaccard as aj

    monkeypatch.setattr(aj, "last_layer_attention", channel_attention)

    def run(val: TensorSegmentationDataset | None, test: TensorSegmentationDataset | None) -> dict[str, float]:
        splits = SegmentationSplits(val if test is None else test, val, test, 8, 3, (0.5,) * 3, (0.5,) * 3, 1, mask_classes=["bg", "fg"])
        # 0.99: every patch a binary map attends to is kept, none of the others
        return AttentionJaccard(threshold=0.99)(tiny_vit(), splits, inputs=DenseInputs((0.5,) * 3, (0.5,) * 3, "cpu"))

    return run


def test_single_head_is_chosen_on_val_and_reported_on_test(fixed_attention) -> None:
    """Val: head 0 right, head 1 wrong. Test: head 1 right on both images, head 0 on one. Head 0
    is chosen (on val); on test it scores 50, though head 1 would score 100 there."""
    val = two_head_split([(True, False), (True, False)])
    test = two_head_split([(True, True), (False, True)])
    m = fixed_attention(val, test)
    assert m == {
        "attention_jaccard/best_head": 100.0, "attention_jaccard/mean_head": 75.0,
        "attention_jaccard/single_head": 50.0, "attention_jaccard/single_head_index": 0.0,
        "attention_jaccard/val_best_head": 100.0, "attention_jaccard/val_mean_head": 50.0,
        "attention_jaccard/val_single_head": 100.0, "attention_jaccard/val_single_head_index": 0.0,
    }


def test_without_val_no_single_head_is_reported_on_test(fixed_attention) -> None:
    """Nothing to choose the head on but the test split itself: no test single_head."""
    m = fixed_attention(None, two_head_split([(True, True), (False, True)]))
    assert m == {"attention_jaccard/best_head": 100.0, "attention_jaccard/mean_head": 75.0}


def test_without_test_the_val_scores_are_named_val(fixed_attention) -> None:
    m = fixed_attention(two_head_split([(True, False), (False, True), (False, True)]), None)
    assert m == {"attention_jaccard/val_best_head": 100.0, "attention_jaccard/val_mean_head": 50.0,
                 "attention_jaccard/val_single_head": pytest.approx(200 / 3),
                 "attention_jaccard/val_single_head_index": 1.0}


def test_encoder_without_attention_is_refused() -> None:
    splits = synthetic_shapes(n_train=4, n_val=4, n_test=4)
    conv = nn.Sequential(nn.Conv2d(3, 8, 8, 8), nn.Flatten(), nn.LazyLinear(4))
    inputs = DenseInputs(splits.mean, splits.std, "cpu")
    with pytest.raises(ValueError, match="needs a ViT with self-attention"):
        AttentionJaccard()(conv, splits, inputs=inputs)


def test_config_instantiates() -> None:
    ev = instantiate(OmegaConf.load(CONF / "evaluator" / "attention_jaccard.yaml"))
    assert isinstance(ev, AttentionJaccard) and ev.threshold == 0.6
