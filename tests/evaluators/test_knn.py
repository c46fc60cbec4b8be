"""Weighted kNN (DINO eval_knn.py): hand-checked scores and end-to-end sanity."""

from __future__ import annotations

import inspect
import math
from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from vfm.evaluators.features import SplitFeatures
from vfm.evaluators.knn import KNN, knn_predict

CONF = Path(__file__).resolve().parents[2] / "conf" / "evaluator" / "knn.yaml"


def test_knn_predict_hand_computed() -> None:
    # Unnormalised on purpose: only directions matter (cosine similarity).
    train_x = torch.tensor([[3.0, 0.0], [0.0, 2.0], [-1.0, 0.0], [0.6, 0.8]])
    train_y = torch.tensor([0, 1, 1, 0])
    query = torch.tensor([[2.0, 0.0], [0.0, -5.0]])
    t = 0.5
    scores = knn_predict(train_x, train_y, query, num_classes=3, k=3, temperature=t)
    # query 0 = (1, 0): sims 1, 0, -1, 0.6 -> neighbours #0 (c0), #3 (c0), #1 (c1)
    # query 1 = (0, -1): sims 0, -1, 0, -0.8 -> neighbours #0 (c0), #2 (c1), #3 (c0)
    expected = torch.tensor(
        [
            [math.exp(1 / t) + math.exp(0.6 / t), math.exp(0 / t), 0.0],
            [math.exp(0 / t) + math.exp(-0.8 / t), math.exp(0 / t), 0.0],
        ]
    )
    torch.testing.assert_close(scores, expected)


def test_knn_predict_chunking_and_k_clamp() -> None:
    g = torch.Generator().manual_seed(0)
    train_x, train_y = torch.randn(50, 8, generator=g), torch.randint(0, 4, (50,), generator=g)
    query = torch.randn(13, 8, generator=g)
    full = knn_predict(train_x, train_y, query, num_classes=4, k=7)
    torch.testing.assert_close(knn_predict(train_x, train_y, query, num_classes=4, k=7, batch_size=3), full)
    # k > N: every training point votes.
    big = knn_predict(train_x[:5], train_y[:5], query, num_classes=4, k=100, temperature=1.0)
    sims = torch.nn.functional.normalize(query, dim=1) @ torch.nn.functional.normalize(train_x[:5], dim=1).T
    expected = torch.zeros(13, 4).index_add_(1, train_y[:5], sims.exp())
    torch.testing.assert_close(big, expected)


def clusters(n: int, num_classes: int, dim: int, seed: int, random_labels: bool = False) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(num_classes, dim, generator=torch.Generator().manual_seed(123)) * 5
    y = torch.randint(0, num_classes, (n,), generator=g)
    x = centers[y] + torch.randn(n, dim, generator=g)
    if random_labels:
        y = torch.randint(0, num_classes, (n,), generator=g)
    return x, y


def split_features(num_classes: int, random_labels: bool = False, with_test: bool = True) -> SplitFeatures:
    tx, ty = clusters(2000, num_classes, 16, 0, random_labels)
    vx, vy = clusters(500, num_classes, 16, 1, random_labels)
    sx, sy = clusters(1000, num_classes, 16, 2, random_labels) if with_test else (None, None)
    return SplitFeatures(tx, ty, vx, vy, sx, sy)


def test_knn_separable_clusters() -> None:
    m = KNN()(split_features(10), num_classes=10)
    assert set(m) == {"knn/top1", "knn/top5", "knn/val_top1", "knn/val_top5"}
    assert m["knn/top1"] >= 99.0 and m["knn/val_top1"] >= 99.0 and m["knn/top5"] == 100.0


def test_knn_random_labels_near_chance() -> None:
    m = KNN()(split_features(10, random_labels=True), num_classes=10)
    # chance = 10%; binomial std on 1000 test points is ~1%, seeds fixed.
    assert 5.0 <= m["knn/top1"] <= 15.0
    assert 40.0 <= m["knn/top5"] <= 60.0


def test_knn_without_test_and_few_classes() -> None:
    m = KNN(k=5)(split_features(3, with_test=False), num_classes=3)
    assert set(m) == {"knn/val_top1"}  # no test keys, no top5 with < 5 classes


def test_knn_missing_labels() -> None:
    f = split_features(3)
    f.train_y = f.train_y.clone()
    f.train_y[0] = -1
    with pytest.raises(ValueError, match="missing labels"):
        KNN()(f, num_classes=3)


def test_knn_yaml_matches_constructor() -> None:
    cfg = OmegaConf.load(CONF)
    params = set(inspect.signature(KNN).parameters) - {"device"}
    assert set(cfg) - {"_target_"} == params
    knn = instantiate(cfg)
    assert isinstance(knn, KNN) and (knn.k, knn.temperature) == (20, 0.07)
