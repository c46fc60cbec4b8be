"""k-shot classification on frozen features over seeded episodes.

Protocol (stated in `docs/evaluation.md`): for each shot count k and each episode e = 0..E-1, draw
k labelled training images per class with a generator seeded by `(seed, k, e)`, fit a classifier
on those `k * C` L2-normalised features, and classify the whole test split (and, separately, the
validation split). Reported: mean and standard deviation of top-1 (%) over the E episodes.

Classifiers:
- `prototype`: nearest class mean by cosine similarity (the prototypical-network rule, Snell et al.
  NeurIPS 2017, without training);
- `linear`: multinomial logistic regression on the normalised features, trained full-batch with
  L-BFGS for a fixed number of iterations and a fixed L2 penalty (nothing is tuned on test).
"""

from __future__ import annotations

import logging
import statistics
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from vfm.evaluators.features import SplitFeatures
from vfm.evaluators.metrics import topk_accuracy
from vfm.evaluators.protocols import FrozenFeatureEvaluator

log = logging.getLogger(__name__)


def sample_episode(labels: Tensor, shots: int, num_classes: int, generator: torch.Generator) -> Tensor:
    """Indices of `shots` random examples of every class (`[shots * C]`, class-major order)."""
    picks = []
    for c in range(num_classes):
        members = (labels == c).nonzero().flatten()
        if len(members) < shots:
            raise ValueError(f"few-shot: class {c} has {len(members)} training images, fewer than {shots} shots")
        picks.append(members[torch.randperm(len(members), generator=generator)[:shots]])
    return torch.cat(picks)


def prototype_scores(support_x: Tensor, support_y: Tensor, query_x: Tensor, num_classes: int) -> Tensor:
    """`[Q, C]` cosine similarity of each query to each class's mean normalised support feature."""
    support = F.normalize(support_x.float(), dim=1)
    protos = torch.zeros(num_classes, support.shape[1]).index_add_(0, support_y, support)
    return F.normalize(query_x.float(), dim=1) @ F.normalize(protos, dim=1).T


def logistic_scores(support_x: Tensor, support_y: Tensor, query_x: Tensor, num_classes: int,
                    *, l2: float = 1e-3, iterations: int = 100) -> Tensor:
    """`[Q, C]` logits of a logistic-regression classifier fitted on the support set (L-BFGS)."""
    x = F.normalize(support_x.float(), dim=1)
    linear = torch.nn.Linear(x.shape[1], num_classes)
    torch.nn.init.zeros_(linear.weight)
    torch.nn.init.zeros_(linear.bias)
    opt = torch.optim.LBFGS(linear.parameters(), max_iter=iterations, line_search_fn="strong_wolfe")

    def closure() -> Tensor:
        opt.zero_grad()
        loss = F.cross_entropy(linear(x), support_y) + l2 * linear.weight.square().sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    with torch.no_grad():
        return linear(F.normalize(query_x.float(), dim=1))


class FewShot(FrozenFeatureEvaluator):
    """k-shot top-1 over seeded episodes, mean ± std (see the module docstring).

    Args:
        shots: shot counts k (labelled images per class).
        episodes: episodes per shot count.
        classifier: `prototype` (nearest class mean, cosine) or `linear` (logistic regression).
        seed: base seed of the episode draws (the same episodes for every encoder).
    """

    def __init__(self, shots: Sequence[int] = (1, 5, 10), episodes: int = 10,
                 classifier: str = "prototype", seed: int = 0) -> None:
        if not shots or min(shots) < 1:
            raise ValueError(f"shots must be positive, got {list(shots)}")
        if episodes < 1:
            raise ValueError(f"episodes must be >= 1, got {episodes}")
        if classifier not in ("prototype", "linear"):
            raise ValueError(f"classifier must be 'prototype' or 'linear', got {classifier!r}")
        self.shots, self.episodes = tuple(int(k) for k in shots), episodes
        self.classifier, self.seed = classifier, seed

    def _episode_accuracy(self, features: SplitFeatures, split: str, shots: int, episode: int,
                          num_classes: int) -> float:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + shots * 1009 + episode)
        idx = sample_episode(features.train_y, shots, num_classes, generator)
        fit = prototype_scores if self.classifier == "prototype" else logistic_scores
        scores = fit(features.train_x[idx], features.train_y[idx].long(), getattr(features, f"{split}_x"), num_classes)
        return topk_accuracy(scores, getattr(features, f"{split}_y"), 1)

    def __call__(self, features: SplitFeatures, num_classes: int) -> dict[str, float]:
        """Return `fewshot/{k}shot_top1` and `..._std` on test, `fewshot/val_{k}shot_*` on val."""
        if features.val_x is None and features.test_x is None:
            raise ValueError("few-shot needs a val or test split to evaluate on")
        metrics: dict[str, float] = {}
        for split, prefix in (("test", "fewshot/"), ("val", "fewshot/val_")):
            if getattr(features, f"{split}_x") is None:
                continue
            for k in self.shots:
                accs = [self._episode_accuracy(features, split, k, e, num_classes) for e in range(self.episodes)]
                metrics[f"{prefix}{k}shot_top1"] = statistics.fmean(accs)
                metrics[f"{prefix}{k}shot_top1_std"] = statistics.pstdev(accs)
        log.info("few-shot (%s, %d episodes): %s", self.classifier, self.episodes,
                 ", ".join(f"{k}={v:.2f}" for k, v in metrics.items() if not k.endswith("_std")))
        return metrics
