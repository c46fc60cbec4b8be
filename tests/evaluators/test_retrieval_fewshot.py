"""Retrieval and few-shot evaluators on features with a known answer."""

from __future__ import annotations

import pytest
import torch

from vfm.evaluators.features import SplitFeatures
from vfm.evaluators.fewshot import FewShot, sample_episode
from vfm.evaluators.retrieval import Retrieval, retrieval_metrics


def _clustered(n_per_class: int, num_classes: int, dim: int, noise: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    centres = torch.eye(num_classes, dim) * 10
    y = torch.arange(num_classes).repeat_interleave(n_per_class)
    return centres[y] + noise * torch.randn(len(y), dim, generator=g), y


def _split(noise: float, seed: int = 0) -> SplitFeatures:
    tx, ty = _clustered(50, 10, 16, noise, seed)
    vx, vy = _clustered(10, 10, 16, noise, seed + 1)
    sx, sy = _clustered(20, 10, 16, noise, seed + 2)
    return SplitFeatures(tx, ty, vx, vy, sx, sy)


def test_retrieval_hand_example() -> None:
    # Query of class 0; ranking by cosine: [class 0, class 1, class 0] -> AP = (1/1 + 2/3) / 2.
    gallery = torch.tensor([[1.0, 0.0], [0.8, 0.6], [0.0, 1.0]])
    gallery_y = torch.tensor([0, 1, 0])
    out = retrieval_metrics(gallery, gallery_y, torch.tensor([[1.0, 0.1]]), torch.tensor([0]), ks=(1, 2))
    assert out["map"] == pytest.approx(100 * (1 + 2 / 3) / 2)
    assert out["recall@1"] == 100.0 and out["recall@2"] == 100.0
    out = retrieval_metrics(gallery, gallery_y, torch.tensor([[1.0, 0.1]]), torch.tensor([1]), ks=(1, 2))
    assert out["map"] == pytest.approx(100 * 1 / 2) and out["recall@1"] == 0.0 and out["recall@2"] == 100.0


def test_retrieval_separable_features_give_map_100() -> None:
    out = Retrieval()(_split(noise=0.1), num_classes=10)
    assert out["retrieval/map"] == pytest.approx(100.0)
    assert out["retrieval/recall@1"] == 100.0 and out["retrieval/val_recall@5"] == 100.0


def test_retrieval_random_features_give_the_class_prior() -> None:
    g = torch.Generator().manual_seed(0)
    feats = SplitFeatures(torch.randn(2000, 32, generator=g), torch.arange(10).repeat(200),
                          test_x=torch.randn(500, 32, generator=g), test_y=torch.arange(10).repeat(50))
    out = Retrieval()(feats, num_classes=10)
    assert out["retrieval/map"] == pytest.approx(10.0, abs=1.0)  # balanced 10 classes: prior 10%
    assert out["retrieval/recall@1"] == pytest.approx(10.0, abs=4.0)


def test_max_gallery_draws_a_seeded_subset_of_a_class_sorted_train_split() -> None:
    """ImageFolder order is class-sorted: the first 50 of 10 x 10 images would hold classes 0-4 only,
    and every query of classes 5-9 would miss (recall@1 50%). A seeded draw keeps every class."""
    feats = _split(noise=0.1)
    feats.train_x, feats.train_y = _clustered(10, 10, 16, 0.1, seed=3)  # sorted by class
    out = Retrieval(max_gallery=50)(feats, num_classes=10)
    assert out["retrieval/recall@1"] == 100.0 and out["retrieval/val_recall@1"] == 100.0
    assert out["retrieval/map"] == pytest.approx(100.0)


def test_retrieval_rejects_unlabelled_gallery() -> None:
    feats = _split(0.1)
    feats.train_y[0] = -1
    with pytest.raises(ValueError, match="labelled"):
        Retrieval()(feats, num_classes=10)


def test_episode_draws_k_per_class_and_is_seeded() -> None:
    y = torch.arange(5).repeat(20)
    a = sample_episode(y, 3, 5, torch.Generator().manual_seed(1))
    b = sample_episode(y, 3, 5, torch.Generator().manual_seed(1))
    assert torch.equal(a, b)
    assert torch.equal(torch.bincount(y[a], minlength=5), torch.full((5,), 3))
    with pytest.raises(ValueError, match="fewer than 30 shots"):
        sample_episode(y, 30, 5, torch.Generator())


@pytest.mark.parametrize("classifier", ["prototype", "linear"])
def test_fewshot_separable_features_are_solved(classifier: str) -> None:
    out = FewShot(shots=(1, 5), episodes=3, classifier=classifier)(_split(noise=0.5), num_classes=10)
    assert out["fewshot/1shot_top1"] == 100.0 and out["fewshot/5shot_top1_std"] == 0.0
    assert out["fewshot/val_5shot_top1"] == 100.0


def test_fewshot_random_features_are_at_chance() -> None:
    g = torch.Generator().manual_seed(0)
    feats = SplitFeatures(torch.randn(500, 32, generator=g), torch.arange(10).repeat(50),
                          test_x=torch.randn(2000, 32, generator=g), test_y=torch.arange(10).repeat(200))
    out = FewShot(shots=(5,), episodes=5)(feats, num_classes=10)
    assert out["fewshot/5shot_top1"] == pytest.approx(10.0, abs=2.5)
    assert out["fewshot/5shot_top1_std"] > 0


def test_fewshot_rejects_bad_options() -> None:
    with pytest.raises(ValueError, match="classifier"):
        FewShot(classifier="svm")
    with pytest.raises(ValueError, match="episodes"):
        FewShot(episodes=0)
