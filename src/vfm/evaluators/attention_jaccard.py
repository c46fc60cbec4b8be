"""Jaccard similarity between a ViT's thresholded [CLS] attention and the foreground mask.

The protocol of DINO (Caron et al. 2021, Sec. 4.2.1 / Fig. 4; the code was never released, its
author described it in facebookresearch/dino#54): for each head of the last block, the [CLS]
query's attention over the patches is thresholded to keep the smallest set of patches holding 60%
of its mass (``visualize_attention.py --threshold 0.6``, :func:`vfm.viz.attention.attention_threshold_mask`),
and compared with the ground-truth mask by Jaccard (intersection over union). Ours, precisely:

- the image as the dataset gives it (single scale), normalised like every evaluator's input;
- the kept patches are upsampled to the mask resolution by nearest neighbour (each patch covers
  its pixels, as DINO's ``interpolate(scale_factor=patch_size, mode="nearest")``);
- foreground = mask > 0 (every object class merged), pixels labelled 255 left out of both sets;
  images without foreground are skipped;
- reported in percent, averaged over the images of the test split and, as ``val_best_head``, ...,
  of the val split: ``best_head``, the best head of each image (DINO's ``max`` over heads),
  ``mean_head``, the mean over heads, and ``single_head``, the score of the one head with the best
  val average (its index as ``single_head_index``). The head is chosen on val only: without a val
  split no test ``single_head`` is reported.

DINO scores each object class of a VOC image separately (best head per object, averaged over the
objects); with one foreground per image (Fashion-MNIST) the two agree.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vfm.data.datasets.segmentation import IGNORE_INDEX, segmentation_batches
from vfm.evaluators.dense_features import DenseInputs
from vfm.evaluators.features import _frozen_on
from vfm.evaluators.protocols import DenseEvaluator
from vfm.viz.attention import as_vision_transformer, attention_threshold_mask, last_layer_attention

log = logging.getLogger(__name__)

__all__ = ["AttentionJaccard", "attention_jaccard"]


def attention_jaccard(maps: Tensor, masks: Tensor, *, threshold: float = 0.6,
                      ignore_index: int = IGNORE_INDEX) -> tuple[Tensor, Tensor]:
    """Per image and head: Jaccard ``[B, heads]`` of the thresholded ``maps [B, heads, h, w]``
    against the foreground of ``masks [B, H, W]``, and whether the image has foreground ``[B]``."""
    keep = attention_threshold_mask(maps, threshold).float()
    keep = F.interpolate(keep, size=tuple(masks.shape[-2:]), mode="nearest").bool()  # [B, heads, H, W]
    valid = (masks != ignore_index)[:, None]
    fg = ((masks > 0) & (masks != ignore_index))[:, None]
    inter = (keep & fg & valid).flatten(2).sum(-1)
    union = ((keep | fg) & valid).flatten(2).sum(-1)
    return inter.double() / union.clamp_min(1).double(), fg.flatten(1).any(-1)


class AttentionJaccard(DenseEvaluator):
    """DINO's attention-mask Jaccard (see the module docstring).

    Args:
        threshold: fraction of each head's attention mass kept (DINO: 0.6).
        max_images: score only the first so many images of the split (None: all).
    """

    def __init__(self, threshold: float = 0.6, max_images: int | None = None) -> None:
        if not 0.0 < threshold <= 1.0:
            raise ValueError(f"evaluator.attention_jaccard.threshold must be in (0, 1], got {threshold}")
        self.threshold, self.max_images = float(threshold), max_images
        self.figures: dict[str, Tensor] = {}

    @torch.no_grad()
    def __call__(self, encoder: nn.Module, splits: Any, *, inputs: DenseInputs,
                 out_dir: str | Path | None = None) -> dict[str, float]:
        """``attention_jaccard/{best_head,mean_head,single_head,single_head_index}`` on the test split
        and ``attention_jaccard/val_...`` on the val split, in percent; ``single_head`` only with a
        val split to choose the head on."""
        try:
            vit = as_vision_transformer(encoder)
        except ValueError as e:
            raise ValueError(f"evaluator=[attention_jaccard] needs a ViT with self-attention: {e}") from e
        if getattr(vit, "cls_token", None) is None:
            raise ValueError("evaluator=[attention_jaccard] needs a ViT with a [CLS] token (class_token=True)")
        parts = {split: getattr(splits, split, None) for split in ("val", "test")}
        parts = {split: dataset for split, dataset in parts.items() if dataset is not None}
        if not parts:
            raise ValueError("attention_jaccard needs a test or val split with masks")
        ignore = int(getattr(splits, "ignore_index", IGNORE_INDEX))
        with _frozen_on(encoder, inputs.device):
            jac = {split: self._scores(encoder, dataset, inputs, ignore, split) for split, dataset in parts.items()}
        # the single head is chosen on val: chosen on the split it is reported on, it would be
        # the best of several test scores, biased upwards
        single = int(jac["val"].mean(0).argmax()) if "val" in jac else None
        metrics: dict[str, float] = {}
        for split, prefix in (("test", "attention_jaccard/"), ("val", "attention_jaccard/val_")):
            if split in jac:
                metrics.update(_summary(jac[split], single, prefix))
        log.info("attention Jaccard (%s, %d heads, threshold %g): %s",
                 ", ".join(f"{split} {len(j)} images" for split, j in jac.items()), jac[next(iter(jac))].shape[1],
                 self.threshold, ", ".join(f"{k}={v:.2f}" for k, v in metrics.items()))
        return metrics

    def _scores(self, encoder: nn.Module, dataset: Any, inputs: DenseInputs, ignore: int, split: str) -> Tensor:
        """Jaccard ``[N, heads]`` of the images of ``dataset`` that have foreground."""
        scores: list[Tensor] = []
        for images, masks in segmentation_batches(dataset, inputs.batch_size, limit=self.max_images):
            maps = last_layer_attention(encoder, inputs.normalise(images)).float().cpu()
            jac, has_fg = attention_jaccard(maps, masks, threshold=self.threshold, ignore_index=ignore)
            scores.append(jac[has_fg])
        jac = torch.cat(scores) if scores else torch.empty(0, 0)
        if len(jac) == 0:
            raise ValueError(f"attention_jaccard: no image of the {split} split has foreground pixels (mask > 0)")
        return jac


def _summary(jac: Tensor, single: int | None, prefix: str) -> dict[str, float]:
    """``best_head``, ``mean_head`` and, given the chosen head, its ``single_head`` score and index."""
    metrics = {f"{prefix}best_head": 100 * float(jac.amax(1).mean()), f"{prefix}mean_head": 100 * float(jac.mean())}
    if single is not None:
        metrics[f"{prefix}single_head"] = 100 * float(jac[:, single].mean())
        metrics[f"{prefix}single_head_index"] = float(single)
    return metrics
