"""Image-to-image retrieval by cosine similarity on frozen features.

Protocol (stated in `docs/evaluation.md`): every image of the test split (and, separately, of the
validation split) is a query; the gallery is the train split. Features are L2-normalised and the
gallery is ranked by cosine similarity to the query. A gallery image is relevant when it has the
query's class. Reported, in percent and averaged over queries:

- `map`: mean average precision over the full ranking (AP = mean of precision@rank over the ranks
  of the relevant items), as in metric-learning and landmark retrieval benchmarks;
- `recall@k` (k = 1, 5 by default): the fraction of queries with at least one relevant image in
  their top k (the metric-learning "Recall@K" of Song et al., CVPR 2016, not recall of all items).

Random features give `map` equal to the class prior (10% on a balanced 10-class set); features
that separate the classes give 100.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from vfm.evaluators.features import SplitFeatures
from vfm.evaluators.protocols import FrozenFeatureEvaluator

log = logging.getLogger(__name__)


@torch.no_grad()
def retrieval_metrics(
    gallery_x: Tensor,
    gallery_y: Tensor,
    query_x: Tensor,
    query_y: Tensor,
    *,
    ks: Sequence[int] = (1, 5),
    batch_size: int = 256,
) -> dict[str, float]:
    """Return `{"map": ..., "recall@k": ...}` in percent for class-level retrieval.

    Args:
        gallery_x: `[N, D]` gallery features; gallery_y: `[N]` int labels.
        query_x: `[Q, D]` query features; query_y: `[Q]` int labels.
        ks: cut-offs for recall@k (clamped to N).
        batch_size: queries per chunk; bounds the `[batch, N]` similarity matrix in memory.
    """
    if len(gallery_x) == 0 or len(query_x) == 0:
        raise ValueError("retrieval needs a non-empty gallery and query set")
    gallery = F.normalize(gallery_x.float(), dim=1)
    gallery_y = gallery_y.long()
    ap_sum, hits = 0.0, {k: 0 for k in ks}
    ranks = torch.arange(1, len(gallery) + 1, dtype=torch.float32)
    for start in range(0, len(query_x), batch_size):
        q = F.normalize(query_x[start : start + batch_size].float(), dim=1)
        order = (q @ gallery.T).argsort(dim=1, descending=True)
        relevant = (gallery_y[order] == query_y[start : start + batch_size, None].long()).float()
        # AP = sum over relevant ranks r of precision@r, divided by the number of relevant items.
        precision_at_rank = relevant.cumsum(dim=1) / ranks
        num_relevant = relevant.sum(dim=1).clamp(min=1)
        ap_sum += float(((precision_at_rank * relevant).sum(dim=1) / num_relevant).sum())
        for k in ks:
            hits[k] += int(relevant[:, : min(k, len(gallery))].amax(dim=1).sum())
    n = len(query_x)
    return {"map": 100.0 * ap_sum / n, **{f"recall@{k}": 100.0 * hits[k] / n for k in ks}}


class Retrieval(FrozenFeatureEvaluator):
    """Class-level image retrieval: queries from test (and val), gallery = train split.

    Args:
        ks: recall@k cut-offs.
        batch_size: queries per similarity chunk.
        max_gallery: keep at most this many gallery images (the first ones in dataset order;
            None = all) to bound the cost of ranking on large training sets.
    """

    def __init__(self, ks: Sequence[int] = (1, 5), batch_size: int = 256, max_gallery: int | None = None) -> None:
        if not ks or min(ks) < 1:
            raise ValueError(f"ks must be positive cut-offs, got {list(ks)}")
        if max_gallery is not None and max_gallery < 1:
            raise ValueError(f"max_gallery must be >= 1 or null, got {max_gallery}")
        self.ks = tuple(int(k) for k in ks)
        self.batch_size = batch_size
        self.max_gallery = max_gallery

    def __call__(self, features: SplitFeatures, num_classes: int) -> dict[str, float]:
        """Return `retrieval/map`, `retrieval/recall@k` on test and `retrieval/val_*` on val."""
        if features.val_x is None and features.test_x is None:
            raise ValueError("retrieval needs a val or test split for queries")
        gallery_x, gallery_y = features.train_x, features.train_y
        if self.max_gallery is not None:
            gallery_x, gallery_y = gallery_x[: self.max_gallery], gallery_y[: self.max_gallery]
        if (gallery_y < 0).any():
            raise ValueError("retrieval needs labelled train images for the gallery (found label -1)")
        metrics: dict[str, float] = {}
        for split, prefix in (("test", "retrieval/"), ("val", "retrieval/val_")):
            x, y = getattr(features, f"{split}_x"), getattr(features, f"{split}_y")
            if x is None or y is None:
                continue
            out = retrieval_metrics(gallery_x, gallery_y, x, y, ks=self.ks, batch_size=self.batch_size)
            metrics.update({prefix + k: v for k, v in out.items()})
        log.info("retrieval (gallery=%d): %s", len(gallery_x),
                 ", ".join(f"{k}={v:.2f}" for k, v in metrics.items()))
        return metrics
