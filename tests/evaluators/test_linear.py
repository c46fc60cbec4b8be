"""Linear probe: accuracy sanity, lr selection on val (never test), determinism, config."""

from __future__ import annotations

import inspect
import logging
from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from vfm.evaluators.features import SplitFeatures
from vfm.evaluators.linear import LinearProbe

CONF = Path(__file__).resolve().parents[2] / "conf" / "evaluator" / "linear.yaml"
FAST = {"epochs": 10, "batch_size": 256}
RECIPE_KEYS = ("linear/n_last_blocks", "linear/avgpool")  # which features the chosen head read


def clusters(n: int, num_classes: int, seed: int, random_labels: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    # Large offset / scale: standardisation inside the probe must cope with them.
    centers = torch.randn(num_classes, 16, generator=torch.Generator().manual_seed(123)) * 4 + 50
    y = torch.randint(0, num_classes, (n,), generator=g)
    x = (centers[y] + torch.randn(n, 16, generator=g)) * 10
    if random_labels:
        y = torch.randint(0, num_classes, (n,), generator=g)
    return x, y


def split_features(num_classes: int = 10, random_labels: bool = False) -> SplitFeatures:
    return SplitFeatures(
        *clusters(2000, num_classes, 0, random_labels),
        *clusters(500, num_classes, 1, random_labels),
        *clusters(1000, num_classes, 2, random_labels),
    )


def correlated(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Two classes separable only along x0 - x1: a shared nuisance dominates both coordinates.

    The first gradient steps point along the class-mean difference (x0 alone), which is ~62%
    accurate; only a well-converged head finds x0 - x1 (~100%). So a tiny lr is clearly worse.
    """
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 2, (n,), generator=g)
    nuisance = torch.randn(n, generator=g) * 3
    x = torch.stack([y * 2.0 - 1 + nuisance, nuisance], 1) + 0.1 * torch.randn(n, 2, generator=g)
    return x, y


def test_separable_clusters() -> None:
    m = LinearProbe(**FAST)(split_features(), num_classes=10)
    assert set(m) == {"linear/top1", "linear/top5", "linear/val_top1", "linear/best_lr", *RECIPE_KEYS}
    assert m["linear/n_last_blocks"] == 0 and m["linear/avgpool"] == 0  # global features
    assert m["linear/top1"] >= 99.0 and m["linear/val_top1"] >= 99.0


def test_random_labels_near_chance() -> None:
    m = LinearProbe(**FAST)(split_features(random_labels=True), num_classes=10)
    # chance = 10%; binomial std on 1000 test points is ~1%, seeds fixed.
    assert 5.0 <= m["linear/top1"] <= 15.0


def test_best_lr_chosen_on_val_not_test() -> None:
    train, val, test = correlated(1000, 0), correlated(500, 1), correlated(500, 2)
    probe = LinearProbe(lrs=(1e-4, 1.0), **FAST)
    m = probe(SplitFeatures(*train, *val, *test), num_classes=2)
    assert m["linear/best_lr"] == 1.0 and m["linear/val_top1"] >= 98.0 and m["linear/top1"] >= 98.0

    # Flip the test labels: the good head now scores ~0% on test and the tiny-lr head ~38%.
    # Selecting on test would switch heads; selecting on val must not notice.
    flipped = probe(SplitFeatures(*train, *val, test[0], 1 - test[1]), num_classes=2)
    assert flipped["linear/best_lr"] == 1.0
    assert flipped["linear/val_top1"] == m["linear/val_top1"]
    assert flipped["linear/top1"] == pytest.approx(100.0 - m["linear/top1"])


def test_best_lr_follows_val_when_val_labels_disagree_with_test() -> None:
    """The other direction: val labels flipped, test labels true. On val the tiny-lr head (~38%
    on flipped labels) beats the good one (~0%), so selection on val must pick it even though it
    is far worse on test; test is read for the chosen head only."""
    train, val, test = correlated(1000, 0), correlated(500, 1), correlated(500, 2)
    probe = LinearProbe(lrs=(1e-4, 1.0), **FAST)
    honest = probe(SplitFeatures(*train, *val, *test), num_classes=2)
    fooled = probe(SplitFeatures(*train, val[0], 1 - val[1], *test), num_classes=2)
    assert honest["linear/best_lr"] == 1.0 and fooled["linear/best_lr"] == 1e-4
    assert fooled["linear/top1"] < honest["linear/top1"] - 30
    assert fooled["linear/val_top1"] > 100.0 - honest["linear/val_top1"]  # its val score is what won


def test_deterministic() -> None:
    f = split_features(random_labels=True)  # hard task: any nondeterminism would show up
    a = LinearProbe(**FAST, seed=3)(f, num_classes=10)
    b = LinearProbe(**FAST, seed=3)(f, num_classes=10)
    assert a == b


def test_no_val_split_carves_train(caplog: pytest.LogCaptureFixture) -> None:
    f = split_features()
    f.val_x = f.val_y = None
    with caplog.at_level(logging.INFO, logger="vfm.evaluators.linear"):
        m = LinearProbe(**FAST)(f, num_classes=10)
    assert "holding out 200 of 2000" in caplog.text
    assert m["linear/top1"] >= 99.0 and m["linear/val_top1"] >= 99.0


def test_missing_labels_and_no_test() -> None:
    f = split_features(num_classes=3)
    f.test_x = f.test_y = None
    m = LinearProbe(**FAST)(f, num_classes=3)
    assert set(m) == {"linear/val_top1", "linear/best_lr", *RECIPE_KEYS}
    f.train_y = f.train_y.clone()
    f.train_y[0] = -1
    with pytest.raises(ValueError, match="missing labels"):
        LinearProbe(**FAST)(f, num_classes=3)


def test_yaml_matches_constructor() -> None:
    cfg = OmegaConf.load(CONF)
    params = set(inspect.signature(LinearProbe).parameters) - {"device"}
    assert set(cfg) - {"_target_"} == params
    probe = instantiate(cfg, device="cpu")
    assert isinstance(probe, LinearProbe)
    assert probe.lrs == tuple(cfg.lrs) and all(isinstance(lr, float) for lr in probe.lrs)
