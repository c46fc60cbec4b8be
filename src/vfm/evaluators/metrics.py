"""Classification metrics shared by every evaluator."""

from __future__ import annotations

from torch import Tensor


def topk_correct(scores: Tensor, y: Tensor, k: int) -> Tensor:
    """Per-row bool: is the true label among the `k` highest scores? `scores: [..., B, C]`,
    `y: [B]` (leading dimensions broadcast, e.g. one row of scores per linear head)."""
    pred = scores.topk(min(k, scores.shape[-1]), dim=-1).indices
    return (pred == y.to(pred.device)[:, None]).any(dim=-1)


def topk_accuracy(scores: Tensor, y: Tensor, k: int) -> float:
    """Percentage of rows (`scores: [B, C]`) whose true label is among the `k` highest scores."""
    if len(y) == 0:
        return float("nan")
    return topk_correct(scores, y, k).sum().item() * 100.0 / len(y)
