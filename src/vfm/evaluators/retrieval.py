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

Image<->text retrieval (image-text checkpoints, CLIP / SigLIP, on a dataset that captions its test
split): recall@k as CLIP (Radford et al. 2021) reports zero-shot Flickr30k / MSCOCO retrieval (text
and image retrieval, R@1/5/10) and LAION's clip_benchmark computes it (`metrics/zeroshot_retrieval.py`:
a query is a hit when at least one of its positives is in the top k), on (test image, its caption)
pairs, at most `max_pairs` of them drawn with a seeded generator. Images are embedded by the
model's `project_image` on the global feature, captions by `encode_text`, both L2-normalised;
similarity is their dot product (cosine). Identical caption strings are one text (their
embeddings are identical, so no ranking could tell them apart; captions written from class-name
templates repeat): the texts are the distinct captions of the pairs.

- `i2t_r{k}`: every image is a query over the distinct texts; a hit when its own caption is among
  the k most similar;
- `t2i_r{k}`: every pair's caption is a query over the images; a hit when an image whose caption
  is that same text is among the k most similar (the mean over pairs, so a caption shared by m
  images weighs m).

A tie counts against the query: an item that is not relevant but as similar as the best relevant
one ranks above it (a collapsed model whose embeddings are all equal scores 0, not 100). On
distinct captions this is the standard protocol; random embeddings give k/N. Where the caption's
template is drawn independently of the image (`fashion_mnist_captions`), no model can know it,
which caps the recall (about k/10 image->text with 10 templates; `docs/evaluation.md`).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vfm.evaluators.features import SplitFeatures
from vfm.evaluators.protocols import FrozenFeatureEvaluator, OptionalImageText, eval_mode

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


@torch.no_grad()
def image_text_recall(
    image_emb: Tensor,
    text_emb: Tensor,
    text_of_image: Tensor,
    *,
    ks: Sequence[int] = (1, 5, 10),
    batch_size: int = 256,
) -> dict[str, float]:
    """Return `{"i2t_r{k}": ..., "t2i_r{k}": ...}` in percent over N (image, caption) pairs.

    Args:
        image_emb: `[N, E]` image embeddings; text_emb: `[T, E]` embeddings of T distinct texts
            (both compared by cosine, so they need not be normalised).
        text_of_image: `[N]` int, the index in `text_emb` of each image's caption.
        ks: recall cut-offs.
        batch_size: queries per chunk; bounds the `[batch, N]` / `[batch, T]` similarities.

    i2t: image i is a hit at k when fewer than k other texts are at least as similar as its own.
    t2i: the query of pair i is text `text_of_image[i]`; a hit at k when fewer than k images of
    another caption are at least as similar as the most similar image of this caption. The same
    text queried by m pairs has one answer, counted m times (texts no pair uses are distractors
    in i2t and no query in t2i).
    """
    if len(image_emb) == 0 or len(text_emb) == 0 or len(text_of_image) != len(image_emb):
        raise ValueError(f"image-text recall needs N >= 1 images with one text index each, got "
                         f"{len(image_emb)} images, {len(text_of_image)} indices, {len(text_emb)} texts")
    images, texts = F.normalize(image_emb.float(), dim=1), F.normalize(text_emb.float(), dim=1)
    text_of_image = text_of_image.long().to(images.device)
    i2t_above = []  # per image: how many other texts are at least as similar as its own
    for i in range(0, len(images), batch_size):
        # a NaN embedding (a diverged model) is as dissimilar as can be: never a hit by accident
        sim = (images[i : i + batch_size] @ texts.T).nan_to_num(nan=float("-inf"))  # [b, T]
        own = sim.gather(1, text_of_image[i : i + batch_size, None])
        i2t_above.append((sim >= own).sum(1) - 1)  # >=: ties count against the query; -1: the own text
    i2t = torch.cat(i2t_above)
    # t2i over the distinct texts, weighted by how many pairs use each
    weight = torch.bincount(text_of_image, minlength=len(texts))
    t2i_above = []  # per distinct text: how many images of other captions rank at or above its best one
    for t in range(0, len(texts), batch_size):
        sim = (texts[t : t + batch_size] @ images.T).nan_to_num(nan=float("-inf"))  # [b, N]
        relevant = text_of_image[None, :] == torch.arange(t, t + len(sim), device=sim.device)[:, None]
        best = sim.masked_fill(~relevant, float("-inf")).amax(dim=1, keepdim=True)
        t2i_above.append(((sim >= best) & ~relevant).sum(1))
    t2i = torch.cat(t2i_above)
    n = len(images)
    out = {f"i2t_r{k}": 100.0 * int((i2t < k).sum()) / n for k in ks}
    out.update({f"t2i_r{k}": 100.0 * int(weight[t2i < k].sum()) / n for k in ks})
    return out


def sample_pairs(n: int, max_pairs: int | None, seed: int) -> Tensor:
    """Indices (sorted) of at most `max_pairs` of `n` items, drawn with a generator seeded by `seed`:
    the same items for every checkpoint evaluated on the same split."""
    if max_pairs is None or n <= max_pairs:
        return torch.arange(n)
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:max_pairs].sort().values


class Retrieval(FrozenFeatureEvaluator, OptionalImageText):
    """Class-level image retrieval: queries from test (and val), gallery = train split; and, for
    an image-text model on captioned test images, image<->text recall@k (`image_text`).

    Args:
        ks: recall@k cut-offs.
        batch_size: queries per similarity chunk (and captions per text-tower batch).
        max_gallery: keep at most this many gallery images, drawn with `seed` (None = all), to
            bound the cost of ranking on large training sets.
        image_text_ks: the image<->text recall cut-offs (CLIP's 1, 5, 10).
        max_pairs: image<->text retrieval on at most this many test (image, caption) pairs,
            drawn with `seed` (None = all).
        seed: which gallery images and pairs are drawn.
    """

    def __init__(self, ks: Sequence[int] = (1, 5), batch_size: int = 256, max_gallery: int | None = None,
                 image_text_ks: Sequence[int] = (1, 5, 10), max_pairs: int | None = 5000, seed: int = 0) -> None:
        if not ks or min(ks) < 1:
            raise ValueError(f"ks must be positive cut-offs, got {list(ks)}")
        if not image_text_ks or min(image_text_ks) < 1:
            raise ValueError(f"image_text_ks must be positive cut-offs, e.g. [1, 5, 10], got {list(image_text_ks)}")
        if max_gallery is not None and max_gallery < 1:
            raise ValueError(f"max_gallery must be >= 1 or null, got {max_gallery}")
        if max_pairs is not None and max_pairs < 1:
            raise ValueError(f"max_pairs must be >= 1 or null (all test pairs), got {max_pairs}")
        self.ks = tuple(int(k) for k in ks)
        self.batch_size = batch_size
        self.max_gallery = max_gallery
        self.image_text_ks = tuple(int(k) for k in image_text_ks)
        self.max_pairs = max_pairs
        self.seed = int(seed)

    def __call__(self, features: SplitFeatures, num_classes: int) -> dict[str, float]:
        """Return `retrieval/map`, `retrieval/recall@k` on test and `retrieval/val_*` on val."""
        if features.val_x is None and features.test_x is None:
            raise ValueError("retrieval needs a val or test split for queries")
        gallery_x, gallery_y = features.train_x, features.train_y
        if self.max_gallery is not None:
            # a seeded draw, not the first N: folder datasets are sorted by class, a prefix drops classes
            keep = sample_pairs(len(gallery_x), self.max_gallery, self.seed)
            gallery_x, gallery_y = gallery_x[keep], gallery_y[keep]
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

    @torch.no_grad()
    def image_text(self, features: SplitFeatures, *, test_captions: Sequence[str],
                   text_model: nn.Module) -> dict[str, float]:
        """`retrieval/i2t_r{k}` and `retrieval/t2i_r{k}` on the test (image, caption) pairs."""
        if features.test_x is None:
            return {}
        if len(test_captions) != len(features.test_x):
            raise ValueError(f"image-text retrieval needs one caption per test image: {len(test_captions)} "
                             f"captions for {len(features.test_x)} images")
        idx = sample_pairs(len(features.test_x), self.max_pairs, self.seed)
        # identical captions are one text: index the distinct ones in first-seen order
        distinct: dict[str, int] = {}
        text_of_image = torch.tensor([distinct.setdefault(test_captions[i], len(distinct)) for i in idx.tolist()])
        texts = list(distinct)
        device = next(text_model.parameters()).device
        bs = self.batch_size
        with eval_mode(text_model):
            x = features.test_x[idx]
            image_emb = torch.cat([text_model.project_image(x[i : i + bs].to(device)).float() for i in range(0, len(x), bs)])
            text_emb = torch.cat([text_model.encode_text(texts[i : i + bs]).float() for i in range(0, len(texts), bs)])
        out = image_text_recall(image_emb, text_emb, text_of_image, ks=self.image_text_ks, batch_size=bs)
        metrics = {f"retrieval/{k}": v for k, v in out.items()}
        log.info("image-text retrieval (%d pairs, %d distinct captions): %s", len(idx), len(texts),
                 ", ".join(f"{k}={v:.2f}" for k, v in metrics.items()))
        return metrics
