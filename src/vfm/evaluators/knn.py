"""Weighted k-nearest-neighbour classification on frozen features.

The protocol of DINO (Caron et al., "Emerging Properties in Self-Supervised Vision Transformers",
ICCV 2021, Sec. 4.1 and facebookresearch/dino ``eval_knn.py``), itself taken from the
non-parametric instance discrimination paper (Wu et al., "Unsupervised Feature Learning via
Non-Parametric Instance Discrimination", CVPR 2018): features are L2-normalised, the k training
samples with the highest cosine similarity vote for their class with weight ``exp(sim / T)``,
and the class with the largest summed weight wins. Defaults k=20, T=0.07 are DINO's.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import Tensor

from vfm.evaluators.features import SplitFeatures
from vfm.evaluators.metrics import topk_accuracy
from vfm.evaluators.protocols import FrozenFeatureEvaluator

log = logging.getLogger(__name__)


@torch.no_grad()
def knn_predict(
    train_x: Tensor,
    train_y: Tensor,
    query_x: Tensor,
    *,
    num_classes: int,
    k: int = 20,
    temperature: float = 0.07,
    batch_size: int = 1024,
) -> Tensor:
    """Class scores of the DINO weighted kNN classifier.

    Args:
        train_x: memory bank features ``[N, D]``.
        train_y: memory bank labels ``[N]`` in ``[0, num_classes)``.
        query_x: query features ``[Q, D]`` (same device as ``train_x``).
        num_classes: number of classes ``C``.
        k: neighbours per query; clamped to ``N``.
        temperature: ``T`` in the vote weight ``exp(cos_sim / T)``.
        batch_size: queries per chunk; bounds the ``[batch, N]`` similarity matrix in memory.

    Returns:
        ``[Q, C]`` float32 scores: for each class, the summed ``exp(sim / T)`` of the neighbours
        carrying that label (zero for classes without a neighbour).
    """
    if len(train_x) == 0:
        raise ValueError("kNN memory bank is empty")
    k = min(k, len(train_x))
    bank = F.normalize(train_x.float(), dim=1)
    bank_y = train_y.to(bank.device, torch.int64)
    scores = []
    for start in range(0, len(query_x), batch_size):
        q = F.normalize(query_x[start : start + batch_size].to(bank.device, torch.float32), dim=1)
        sim, idx = (q @ bank.T).topk(k, dim=1)
        # scatter_add of the weights into the neighbours' label slots == DINO's one-hot
        # [B*k, C] product, without materialising the one-hot tensor.
        weights = (sim / temperature).exp()
        s = torch.zeros(len(q), num_classes, device=bank.device)
        scores.append(s.scatter_add_(1, bank_y[idx], weights))
    if not scores:
        return torch.empty(0, num_classes, device=bank.device)
    return torch.cat(scores)


def _check_labels(y: Tensor, num_classes: int, split: str) -> None:
    if (y < 0).any():
        raise ValueError(
            f"kNN needs labels, but the {split} split has missing labels (-1); "
            "use a labelled dataset for evaluation"
        )
    if (y >= num_classes).any():
        raise ValueError(f"{split} labels reach {int(y.max())} but num_classes={num_classes}")


class KNN(FrozenFeatureEvaluator):
    """Weighted kNN evaluator (DINO): memory bank = train split, reports val and test accuracy.

    Args:
        k: neighbours (DINO uses 20; 10, 100, 200 are also reported in the paper).
        temperature: vote temperature ``T`` (DINO: 0.07).
        batch_size: queries per similarity chunk.
        device: where the similarity search runs (features are moved there).
    """

    def __init__(
        self,
        k: int = 20,
        temperature: float = 0.07,
        batch_size: int = 1024,
        device: str | torch.device = "cpu",
    ) -> None:
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        self.k = k
        self.temperature = temperature
        self.batch_size = batch_size
        self.device = device

    def __call__(self, features: SplitFeatures, num_classes: int) -> dict[str, float]:
        """Return ``knn/top1`` (+ ``knn/top5`` when ``num_classes >= 5``) on the test split and
        ``knn/val_top1`` (+ ``knn/val_top5``) on the validation split, in percent; keys of a
        missing split are omitted."""
        if features.val_x is None and features.test_x is None:
            raise ValueError("kNN needs a val or test split to evaluate on")
        _check_labels(features.train_y, num_classes, "train")
        bank_x = features.train_x.to(self.device)
        bank_y = features.train_y.to(self.device)
        metrics: dict[str, float] = {}
        for split, prefix in (("test", "knn/"), ("val", "knn/val_")):
            x, y = getattr(features, f"{split}_x"), getattr(features, f"{split}_y")
            if x is None or y is None:
                continue
            _check_labels(y, num_classes, split)
            scores = knn_predict(
                bank_x, bank_y, x, num_classes=num_classes, k=self.k,
                temperature=self.temperature, batch_size=self.batch_size,
            )
            metrics[f"{prefix}top1"] = topk_accuracy(scores, y, 1)
            if num_classes >= 5:
                metrics[f"{prefix}top5"] = topk_accuracy(scores, y, 5)
        log.info(
            "kNN (k=%d, T=%g, bank=%d): %s", self.k, self.temperature, len(bank_x),
            ", ".join(f"{key}={v:.2f}" for key, v in metrics.items()),
        )
        return metrics
