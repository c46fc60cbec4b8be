"""Linear semantic segmentation on frozen patch tokens, scored by mIoU.

The "linear" protocol of DINOv2 (Oquab et al. 2023, Sec. 7.4 / Table 10): a linear layer maps each
frozen patch token to class logits, the low-resolution logit map is upsampled bilinearly to the
mask resolution and trained with per-pixel cross-entropy (pixels labelled 255 ignored); single
scale, no test-time augmentation. Ours, precisely (docs/evaluation.md):

- tokens: the final-norm patch tokens of the frozen encoder (no [CLS] / registers) on the image as
  the dataset gives it, extracted once per split, standardised per dimension with the training
  tokens' mean/std (the role of the BatchNorm in front of DINOv2's linear head);
- head: ``D -> C`` weights and bias, zero-initialised, one head per learning rate, all trained on
  the same mini-batches; AdamW (weight decay on the weights only), cosine lr per step after a
  linear warmup, no augmentation;
- selection: the head with the best validation mIoU (a seeded 10% of train without a val split);
  only that head is scored on test. mIoU = mean over classes of TP / (TP + FP + FN) accumulated
  over the whole split (mmsegmentation's definition; a class absent from both prediction and
  ground truth of a split is left out of the mean);
- memory: the upsampled logits ``[L, B, C, H, W]`` of a mini-batch would take tens of GB (5 lrs,
  256 images of 448x448, 150 classes), so they are computed in blocks of images (and of heads) of
  at most ``max_logit_elements``; a step accumulates the blocks' gradients, the same step as on
  the whole mini-batch.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vfm import distributed as vdist
from vfm.data.datasets.segmentation import IGNORE_INDEX, SegmentationSplits
from vfm.engine.schedules import Cosine
from vfm.evaluators.dense_features import DenseInputs, PatchTokens, extract_patch_tokens
from vfm.evaluators.protocols import DenseEvaluator
from vfm.viz.attention import as_vision_transformer

log = logging.getLogger(__name__)

__all__ = ["LinearSegmentation", "SegmentationHeads", "confusion_matrices", "fit_segmentation_heads", "iou_per_class",
           "predictions"]

DEFAULT_LRS: tuple[float, ...] = (1e-3, 3e-3, 1e-2, 3e-2, 0.1)
# upsampled logits per forward pass: 2^27 float32 = 512 MiB, a few GiB with the backward's buffers
MAX_LOGIT_ELEMENTS = 2**27


class SegmentationHeads(nn.Module):
    """``L`` linear heads ``D -> C`` over standardised tokens; ``forward`` gives logits upsampled
    to the mask size."""

    def __init__(self, num_heads: int, dim: int, num_classes: int, mean: Tensor, std: Tensor) -> None:
        super().__init__()
        self.weight = nn.ParameterList(nn.Parameter(torch.zeros(dim, num_classes)) for _ in range(num_heads))
        self.bias = nn.ParameterList(nn.Parameter(torch.zeros(num_classes)) for _ in range(num_heads))
        self.register_buffer("mean", mean.float())
        self.register_buffer("std", std.float())

    def forward(self, tokens: Tensor, size: tuple[int, int], heads: Sequence[int] | None = None) -> Tensor:
        """tokens ``[B, h, w, D]`` -> logits ``[L, B, C, H, W]`` (bilinear, ``align_corners=False``)."""
        heads = range(len(self.weight)) if heads is None else heads
        x = (tokens.float() - self.mean) / self.std
        w = torch.stack([self.weight[i] for i in heads])
        b = torch.stack([self.bias[i] for i in heads])
        logits = torch.einsum("bhwd,ldc->lbchw", x, w) + b[:, None, :, None, None]
        num, batch, classes, h, wd = logits.shape
        up = F.interpolate(logits.reshape(num * batch, classes, h, wd), size=size, mode="bilinear", align_corners=False)
        return up.reshape(num, batch, classes, *size)


def _blocks(num_heads: int, num_images: int, map_elements: int, max_elements: int,
            max_images: int | None = None) -> Iterator[tuple[range, slice]]:
    """(heads, images) blocks covering every head on every image, each with logits ``[l, b, C, H, W]``
    of at most ``max_elements`` (``map_elements`` = C x H x W; one map even when it is larger) and at
    most ``max_images`` images."""
    heads_per = max(1, min(num_heads, max_elements // map_elements))
    images_per = max(1, min(num_images, max_images or num_images, max_elements // (map_elements * heads_per)))
    for start in range(0, num_images, images_per):
        for head in range(0, num_heads, heads_per):
            yield range(head, min(head + heads_per, num_heads)), slice(start, start + images_per)


def _token_stats(tokens: Tensor, chunk: int = 4096) -> tuple[Tensor, Tensor]:
    """Per-dimension mean and std of ``[N, h, w, D]`` tokens, in float64 chunks (no float32 copy)."""
    dim = tokens.shape[-1]
    flat = tokens.reshape(-1, dim)
    total, sq = torch.zeros(dim, dtype=torch.float64), torch.zeros(dim, dtype=torch.float64)
    for i in range(0, len(flat), chunk):
        part = flat[i : i + chunk].double()
        total += part.sum(0)
        sq += part.square().sum(0)
    mean = total / max(len(flat), 1)
    var = (sq / max(len(flat), 1) - mean.square()).clamp_min(0)
    return mean.float(), var.sqrt().float().clamp_min(1e-6)  # a dead dimension must not divide by zero


def fit_segmentation_heads(
    tokens: Tensor, masks: Tensor, num_classes: int, *, lrs: Sequence[float], epochs: int, batch_size: int,
    weight_decay: float, warmup_epochs: float = 0.0, seed: int = 0, device: str | torch.device = "cpu",
    ignore_index: int = IGNORE_INDEX, max_logit_elements: int = MAX_LOGIT_ELEMENTS,
) -> SegmentationHeads:
    """Train one head per lr on ``tokens [N, h, w, D]`` against ``masks [N, H, W]`` (class indices);
    each mini-batch in blocks of at most ``max_logit_elements`` logits."""
    device = torch.device(device)
    gen = torch.Generator().manual_seed(seed)
    mean, std = _token_stats(tokens)
    heads = SegmentationHeads(len(lrs), tokens.shape[-1], num_classes, mean, std).to(device)
    groups = []
    for w, b in zip(heads.weight, heads.bias, strict=True):
        groups += [{"params": [w], "weight_decay": weight_decay}, {"params": [b], "weight_decay": 0.0}]
    opt = torch.optim.AdamW(groups, lr=1.0)  # lr set per group at every step below
    base = [lr for lr in lrs for _ in range(2)]
    n = len(tokens)
    factor = Cosine(1.0, 0.0, warmup_epochs=warmup_epochs).build(math.ceil(n / batch_size), epochs)
    size = tuple(masks.shape[-2:])
    map_elements = num_classes * size[0] * size[1]
    step = 0
    for _ in range(epochs):
        perm = torch.randperm(n, generator=gen)
        for start in range(0, n, batch_size):
            idx = perm[start : start + batch_size]
            target = masks[idx].to(device).long()
            valid = int((target != ignore_index).sum())
            for group, lr in zip(opt.param_groups, base, strict=True):
                group["lr"] = lr * float(factor[step])
            step += 1
            if valid == 0:
                continue
            opt.zero_grad(set_to_none=True)
            for head_ids, images in _blocks(len(lrs), len(idx), map_elements, max_logit_elements):
                logits = heads(tokens[idx[images]].to(device), size, head_ids)  # [l, b, C, H, W]
                # the sum of each head's mean pixel loss: heads share nothing, so each trains as if
                # alone; dividing by the mini-batch's valid pixels, the blocks' gradients add up to it
                loss = F.cross_entropy(logits.flatten(0, 1), target[images].repeat(len(head_ids), 1, 1),
                                       ignore_index=ignore_index, reduction="sum") / valid
                loss.backward()
            opt.step()
    return heads.eval()


@torch.no_grad()
def predictions(heads: SegmentationHeads, tokens: Tensor, size: tuple[int, int], heads_idx: Sequence[int], *,
                batch_size: int = 256, max_logit_elements: int = MAX_LOGIT_ELEMENTS,
                ) -> Iterator[tuple[range, slice, Tensor]]:
    """Predicted classes of ``tokens [N, h, w, D]`` block by block: ``(positions in heads_idx,
    images, pred [l, b, H, W])``, each block's logits at most ``max_logit_elements``."""
    map_elements = len(heads.bias[0]) * size[0] * size[1]
    for pos, images in _blocks(len(heads_idx), len(tokens), map_elements, max_logit_elements, batch_size):
        logits = heads(tokens[images].to(heads.mean.device), size, [heads_idx[p] for p in pos])
        yield pos, images, logits.argmax(2)


@torch.no_grad()
def confusion_matrices(heads: SegmentationHeads, tokens: Tensor, masks: Tensor, num_classes: int, *,
                       batch_size: int = 256, ignore_index: int = IGNORE_INDEX,
                       heads_idx: Sequence[int] | None = None,
                       max_logit_elements: int = MAX_LOGIT_ELEMENTS) -> Tensor:
    """Pixel confusion ``[L, C, C]`` (rows: ground truth, columns: prediction), ignored pixels left out."""
    device = heads.mean.device
    heads_idx = list(range(len(heads.weight))) if heads_idx is None else list(heads_idx)
    conf = torch.zeros(len(heads_idx), num_classes * num_classes, dtype=torch.int64, device=device)
    blocks = predictions(heads, tokens, tuple(masks.shape[-2:]), heads_idx, batch_size=batch_size,
                         max_logit_elements=max_logit_elements)
    for pos, images, pred in blocks:
        target = masks[images].to(device).long()
        keep = target != ignore_index
        for j, p in zip(pos, pred, strict=True):
            conf[j] += torch.bincount(target[keep] * num_classes + p[keep], minlength=num_classes**2)
    return conf.view(-1, num_classes, num_classes).cpu()


def iou_per_class(conf: Tensor) -> Tensor:
    """IoU ``[..., C]`` from confusion ``[..., C, C]``; NaN for a class with an empty union."""
    tp = conf.diagonal(dim1=-2, dim2=-1).double()
    union = conf.sum(-1).double() + conf.sum(-2).double() - tp
    return torch.where(union > 0, tp / union.clamp_min(1), torch.full_like(tp, float("nan")))


def _key(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "_", name).strip("_") or "class"


def _check_masks(masks: Tensor, num_classes: int, ignore_index: int, split: str) -> None:
    bad = (masks != ignore_index) & (masks.long() >= num_classes)
    if bool(bad.any()):
        raise ValueError(f"segmentation: the {split} masks hold class {int(masks[bad].max())} but the dataset "
                         f"names {num_classes} classes (dataset.classes); {ignore_index} marks ignored pixels")


class LinearSegmentation(DenseEvaluator):
    """Linear segmentation probe on frozen patch tokens (see the module docstring for the protocol).

    Args:
        lrs: AdamW learning-rate grid; one head per entry, the best picked on validation mIoU.
        epochs: passes over the training tokens.
        batch_size: images per step.
        weight_decay: AdamW's decoupled weight decay, on the weights only.
        warmup_epochs: linear lr warmup before the cosine decay to 0.
        max_train_images / max_eval_images: use only the first so many images of train / of val
            and test (None: all); bounds the cost of a periodic evaluation.
        seed: mini-batch order and the validation carve-out.
        n_show: images in the figure of predictions.
    """

    def __init__(self, lrs: Sequence[float] = DEFAULT_LRS, epochs: int = 5, batch_size: int = 256,
                 weight_decay: float = 1e-4, warmup_epochs: float = 0.0, max_train_images: int | None = None,
                 max_eval_images: int | None = None, seed: int = 0, n_show: int = 8) -> None:
        self.lrs = tuple(float(lr) for lr in lrs)
        if not self.lrs or min(self.lrs) <= 0:
            raise ValueError(f"evaluator.segmentation.lrs must be a non-empty list of positive numbers, got {self.lrs}")
        if epochs < 1 or batch_size < 1:
            raise ValueError(f"evaluator.segmentation: epochs and batch_size must be >= 1, got {epochs}, {batch_size}")
        self.epochs, self.batch_size, self.weight_decay = epochs, batch_size, float(weight_decay)
        self.warmup_epochs, self.seed, self.n_show = float(warmup_epochs), seed, n_show
        self.max_train_images, self.max_eval_images = max_train_images, max_eval_images
        self.figures: dict[str, Tensor] = {}

    def __call__(self, encoder: nn.Module, splits: SegmentationSplits, *, inputs: DenseInputs,
                 out_dir: str | Path | None = None) -> dict[str, float]:
        """``segmentation/val_miou`` of the best head, its ``segmentation/best_lr``, and on test
        ``segmentation/miou``, ``segmentation/pixel_acc`` and ``segmentation/iou/<class>``, in percent."""
        names, ignore = list(getattr(splits, "mask_classes", [])), int(getattr(splits, "ignore_index", IGNORE_INDEX))
        if not names:
            raise ValueError("evaluator=[segmentation] needs a dataset with masks: dataset=fashion_mnist_segmentation "
                             "or dataset=segmentation_folder")
        try:
            as_vision_transformer(encoder)
        except ValueError as e:
            raise ValueError(f"evaluator=[segmentation] needs a ViT with patch tokens: {e}") from e
        train, val, test = self._extract(encoder, splits, inputs)
        for split, part in (("train", train), ("val", val), ("test", test)):
            if part is not None:
                _check_masks(part.masks, len(names), ignore, split)
        heads = fit_segmentation_heads(
            train.tokens, train.masks, len(names), lrs=self.lrs, epochs=self.epochs, batch_size=self.batch_size,
            weight_decay=self.weight_decay, warmup_epochs=self.warmup_epochs, seed=self.seed, device=inputs.device,
            ignore_index=ignore)
        val_iou = iou_per_class(confusion_matrices(heads, val.tokens, val.masks, len(names), ignore_index=ignore))
        val_miou = val_iou.nanmean(-1).nan_to_num(-1.0)  # a diverged head (all NaN) is never chosen
        best = int(val_miou.argmax())
        metrics = {"segmentation/val_miou": 100 * float(val_miou[best]), "segmentation/best_lr": self.lrs[best]}
        shown = val
        if test is not None:
            conf = confusion_matrices(heads, test.tokens, test.masks, len(names), ignore_index=ignore, heads_idx=[best])[0]
            iou = iou_per_class(conf)
            metrics["segmentation/miou"] = 100 * float(iou.nanmean())
            metrics["segmentation/pixel_acc"] = 100 * float(conf.diagonal().sum()) / max(int(conf.sum()), 1)
            metrics.update({f"segmentation/iou/{_key(n)}": 100 * float(v) for n, v in zip(names, iou.tolist(), strict=True)
                            if not math.isnan(v)})
            shown = test
        self._figure(heads, best, shown, out_dir)
        log.info("linear segmentation (%d lrs, %d epochs, train=%d, %d classes): best lr %g, %s", len(self.lrs),
                 self.epochs, len(train.tokens), len(names), self.lrs[best],
                 ", ".join(f"{k}={v:.2f}" for k, v in metrics.items() if "/iou/" not in k and k != "segmentation/best_lr"))
        return metrics

    def _extract(self, encoder: nn.Module, splits: SegmentationSplits,
                 inputs: DenseInputs) -> tuple[PatchTokens, PatchTokens, PatchTokens | None]:
        """Train / val / test tokens; without a val split, a seeded 10% of train is held out."""
        train = extract_patch_tokens(encoder, splits.train, inputs, limit=self.max_train_images,
                                     desc="patch tokens/train", n_show=self.n_show)
        test = None if splits.test is None else extract_patch_tokens(
            encoder, splits.test, inputs, limit=self.max_eval_images, desc="patch tokens/test", n_show=self.n_show)
        if splits.val is not None:
            return train, extract_patch_tokens(encoder, splits.val, inputs, limit=self.max_eval_images,
                                               desc="patch tokens/val", n_show=self.n_show), test
        n = len(train.tokens)
        n_val = max(1, n // 10)
        if n_val >= n:
            raise ValueError("segmentation needs a val split or at least 2 training images")
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(self.seed))
        log.info("segmentation: no val split, holding out %d of %d train images (seed %d) to choose the lr",
                 n_val, n, self.seed)
        held, kept = perm[:n_val], perm[n_val:]
        return (PatchTokens(train.tokens[kept], train.masks[kept], train.images),
                PatchTokens(train.tokens[held], train.masks[held], train.images[:0]), test)

    @torch.no_grad()
    def _figure(self, heads: SegmentationHeads, best: int, part: PatchTokens, out_dir: str | Path | None) -> None:
        """Image / ground truth / prediction rows of the first images of ``part``."""
        from vfm.viz.render import save_png
        from vfm.viz.segmentation import segmentation_grid

        n = len(part.images)
        if n == 0:
            self.figures = {}
            return
        blocks = predictions(heads, part.tokens[:n], tuple(part.masks.shape[-2:]), [best])
        pred = torch.cat([p[0].cpu() for _, _, p in blocks])
        grid = segmentation_grid(part.images, part.masks[:n], pred)
        self.figures = {"segmentation/predictions": grid}
        if out_dir is not None and vdist.is_main_process():
            save_png(grid, Path(out_dir) / "predictions.png")
