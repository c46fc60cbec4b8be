"""Linear probe on frozen features, with the learning rate selected on a validation split.

The linear-evaluation protocol of self-supervised pretraining (DINO, Caron et al. 2021,
facebookresearch/dino ``eval_linear.py``; MAE, He et al. 2022, ``main_linprobe.py``): a single
linear layer trained with SGD + momentum and a cosine schedule on top of the frozen encoder.
Like DINOv2 (Oquab et al. 2023, facebookresearch/dinov2 ``eval/linear.py``) we train a grid of
learning rates *at the same time*, as independent heads sharing every mini-batch, and keep the
head with the best validation accuracy; the test split is only used to report that head.

The papers' own choices are options, with ``auto`` picking the one of the paper the method
follows (``paper``, from the method config's ``eval_protocol`` key):

- ``features`` (`vfm.evaluators.recipes`): DINO and iBOT concatenate the [CLS] token of the
  last 4 blocks for ViT-S (``last4_cls``) and the last [CLS] with the mean patch token for ViT-B
  (``cls_avgpool``); DINOv2 trains heads on {1, 4} blocks x {with, without} the patch mean
  (``grid``) and keeps the best on validation; MAE reads the final [CLS] (``cls``); a method
  without a paper protocol reads the encoder's own global feature (``global``, as kNN does: the
  final [CLS] of a ViT, the mean patch token of timm's BEiT and EVA-02, a CNN's pooled feature).
- ``norm``: MAE puts ``BatchNorm1d(affine=False, eps=1e-6)`` in front of its linear head
  (``batchnorm``: batch statistics in training, running ones at evaluation); the default
  standardises with the training set's per-dimension mean/std (``standardize``), which makes
  one lr grid work across encoders whose feature scales differ by orders of magnitude.
- ``optimizer``: SGD + momentum (DINO, DINOv2), or MAE's LARS (``lars``; trust coefficient
  0.001, no scaling or decay of the bias).

Features are pre-extracted once from centre crops, without augmentation, so a probe costs seconds;
DINO, MAE and DINOv2 train through the frozen encoder on RandomResizedCrop + flip views instead.
"""

from __future__ import annotations

import itertools
import logging
import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vfm.engine.schedules import Cosine
from vfm.evaluators.features import GLOBAL, RECIPES, SplitFeatures
from vfm.evaluators.metrics import topk_correct
from vfm.evaluators.protocols import FrozenFeatureEvaluator
from vfm.evaluators.recipes import token_backbone

log = logging.getLogger(__name__)

# Log-spaced around the optimum of a standardised softmax regression; the ends are there so the
# best lr is an interior point for very easy / very hard feature sets.
DEFAULT_LRS: tuple[float, ...] = (1e-3, 3e-3, 1e-2, 3e-2, 0.1, 0.3, 1.0, 3.0)
PAPERS = ("dino", "ibot", "dinov2", "mae")
FEATURES = ("auto", GLOBAL, *RECIPES, "grid")
NORMS = ("auto", "standardize", "batchnorm")
OPTIMIZERS = ("sgd", "lars")
VIT_BASE_WIDTH = 768  # DINO / iBOT: ViT-S (384) and narrower take last4_cls, ViT-B and wider cls_avgpool
BN_EPS = 1e-6  # MAE main_linprobe.py: BatchNorm1d(affine=False, eps=1e-6)
BN_MOMENTUM = 0.1  # PyTorch's BatchNorm1d default, which MAE keeps
LARS_TRUST = 1e-3  # MAE util/lars.py (from MoCo v3)


def paper_features(paper: str | None, width: int) -> str:
    """The linear-probe features of ``paper``'s protocol for an encoder ``width`` wide."""
    if paper in ("dino", "ibot"):  # eval_linear.py --n_last_blocks / --avgpool_patchtokens; iBOT run.sh
        return "cls_avgpool" if width >= VIT_BASE_WIDTH else "last4_cls"
    if paper == "dinov2":  # eval/linear.py: n_last_blocks_list [1, 4] x avgpool [False, True]
        return "grid"
    if paper == "mae":  # main_linprobe.py --cls_token
        return "cls"
    return GLOBAL  # no paper protocol: the encoder's own global feature, as kNN


def _check_choice(name: str, value: str | None, choices: Sequence[str | None]) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(str(c) for c in choices)}; got {value!r}")


class LinearProbe(FrozenFeatureEvaluator):
    """Softmax-regression probe, one head per learning rate (and feature recipe, for ``grid``),
    best head picked on validation.

    Args:
        lrs: learning-rate grid; one head per entry, all trained together on the same batches.
        epochs: passes over the training features.
        batch_size: mini-batch size.
        weight_decay: L2 penalty on the weights (not the bias), shared by all heads.
        momentum: SGD (and LARS) momentum.
        seed: seeds the mini-batch order and the validation carve-out.
        features: ``global`` (the encoder's output), ``cls``, ``last4_cls``, ``cls_avgpool``,
            ``last4_cls_avgpool`` (see `vfm.evaluators.recipes`), ``grid`` (the last four, chosen
            on validation) or ``auto`` (the recipe of ``paper``; ``global`` without one). Encoders
            without a [CLS] token use their pooled global feature.
        paper: whose protocol ``auto`` follows: ``dino``, ``ibot``, ``dinov2``, ``mae`` or None.
        norm: ``standardize`` (train mean/std), ``batchnorm`` (MAE) or ``auto`` (``batchnorm``
            for ``paper=mae``, else ``standardize``).
        optimizer: ``sgd`` or ``lars`` (MAE's).
        warmup_epochs: linear lr warmup before the cosine decay (MAE: 10 of 90 epochs).
        device: where the heads are trained.
    """

    def __init__(
        self,
        lrs: Sequence[float] = DEFAULT_LRS,
        epochs: int = 30,
        batch_size: int = 1024,
        weight_decay: float = 0.0,
        momentum: float = 0.9,
        seed: int = 0,
        features: str = "auto",
        paper: str | None = None,
        norm: str = "auto",
        optimizer: str = "sgd",
        warmup_epochs: float = 0.0,
        device: str | torch.device = "cpu",
    ) -> None:
        self.lrs = tuple(float(lr) for lr in lrs)  # Hydra passes a ListConfig
        if not self.lrs or min(self.lrs) <= 0:
            raise ValueError(f"lrs must be a non-empty list of positive numbers, got {self.lrs}")
        if epochs < 1:
            raise ValueError(f"epochs must be >= 1, got {epochs}")
        if not 0 <= warmup_epochs <= epochs:
            raise ValueError(f"warmup_epochs must lie in [0, epochs={epochs}], got {warmup_epochs}")
        _check_choice("features", features, FEATURES)
        _check_choice("paper", paper, (*PAPERS, None))
        _check_choice("norm", norm, NORMS)
        _check_choice("optimizer", optimizer, OPTIMIZERS)
        self.epochs = epochs
        self.batch_size = batch_size
        self.weight_decay = weight_decay
        self.momentum = momentum
        self.seed = seed
        self.features, self.paper, self.optimizer = features, paper, optimizer
        self.norm = norm if norm != "auto" else ("batchnorm" if paper == "mae" else "standardize")
        self.warmup_epochs = float(warmup_epochs)
        self.device = device

    def feature_recipe(self, encoder: nn.Module) -> str:
        """The recipe to extract: ``features`` (``auto`` resolved for ``encoder``'s width); for
        ``grid`` the superset ``last4_cls_avgpool`` the four recipes are sliced from."""
        features = self.features
        if features == "auto":
            backbone = token_backbone(encoder)
            features = paper_features(self.paper, backbone.embed_dim if backbone is not None else 0)
        return "last4_cls_avgpool" if features == "grid" else features

    def _head_recipes(self, recipe: str) -> list[str]:
        """The recipes the heads read from features of ``recipe``: several for ``grid``."""
        grid = self.features == "grid" or (self.features == "auto" and self.paper == "dinov2")
        if not grid or recipe == GLOBAL:
            return [recipe]
        n_max, has_avg = RECIPES[recipe]
        return [r for r, (n, avg) in RECIPES.items() if n <= n_max and (has_avg or not avg)]

    def __call__(self, features: SplitFeatures, num_classes: int) -> dict[str, float]:
        """Return ``linear/top1`` (+ ``linear/top5`` when ``num_classes >= 5``) on the test split
        for the head with the best validation accuracy, that accuracy as ``linear/val_top1``, its
        learning rate as ``linear/best_lr`` and its features as ``linear/n_last_blocks`` (0: the
        encoder's own global feature) and ``linear/avgpool`` (0 or 1). Accuracies in percent.
        Without a test split only the validation keys are returned."""
        device = torch.device(self.device)
        gen = torch.Generator().manual_seed(self.seed)
        train_x, train_y, val_x, val_y = self._train_val(features, gen)
        for split, y in (("train", train_y), ("val", val_y), ("test", features.test_y)):
            if y is not None and ((y < 0).any() or (y >= num_classes).any()):
                raise ValueError(f"linear probe: {split} labels must lie in [0, {num_classes}) (missing labels are -1)")

        head_recipes = self._head_recipes(features.recipe)
        heads = list(itertools.product(head_recipes, self.lrs))  # (recipe, lr) per head
        masks = _column_masks(features.recipe, head_recipes, train_x.shape[1], len(self.lrs), device)
        if self.norm == "standardize":
            # Standardise with train statistics only (no peeking at val/test).
            std, mean = torch.std_mean(train_x.float(), dim=0)
            # Constant (e.g. dead) dimensions would divide by zero; a 1-sample train split has no std.
            std = torch.nan_to_num(std, nan=1.0).clamp_min(1e-6)
            train_in = ((train_x.float() - mean) / std).to(device)
            weight, bias, _ = self._fit(train_in, train_y.to(device), num_classes, gen, masks)
        else:  # BatchNorm1d(affine=False): evaluation uses the running statistics of training
            weight, bias, (mean, var) = self._fit(train_x.float().to(device), train_y.to(device), num_classes, gen, masks)
            mean, std = mean.cpu(), (var + BN_EPS).sqrt().cpu()

        def prep(x: Tensor) -> Tensor:
            return ((x.float() - mean) / std).to(device)

        best, val_acc = self._select(prep(val_x), val_y, weight, bias, heads)
        recipe, lr = heads[best]
        n_blocks, avgpool = RECIPES.get(recipe, (0, False))
        metrics = {"linear/val_top1": val_acc, "linear/best_lr": lr,
                   "linear/n_last_blocks": float(n_blocks), "linear/avgpool": float(avgpool)}
        if features.test_x is not None and features.test_y is not None:  # read once, for the chosen head
            head_w, head_b = weight[best : best + 1], bias[best : best + 1]
            test_x = prep(features.test_x)
            metrics["linear/top1"] = float(self._accuracy(test_x, features.test_y, head_w, head_b, k=1)[0])
            if num_classes >= 5:
                metrics["linear/top5"] = float(self._accuracy(test_x, features.test_y, head_w, head_b, k=5)[0])
        log.info(
            "linear probe (features %s, norm %s, %s, %d heads, %d epochs, train=%d): best %s lr %g, %s",
            features.recipe, self.norm, self.optimizer, len(heads), self.epochs, len(train_x), recipe, lr,
            ", ".join(f"{k}={v:.2f}" for k, v in metrics.items() if "top" in k),
        )
        return metrics

    def _train_val(self, features: SplitFeatures, gen: torch.Generator) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """(train_x, train_y, val_x, val_y): the val split, or a seeded 10% of train without one."""
        train_x, train_y = features.train_x, features.train_y
        if features.val_x is not None and features.val_y is not None:
            return train_x, train_y, features.val_x, features.val_y
        # Hold out a seeded 10% of train so the lr is never chosen on test.
        perm = torch.randperm(len(train_x), generator=gen)
        n_val = max(1, len(train_x) // 10)
        if n_val >= len(train_x):
            raise ValueError("linear probe needs a val split or at least 2 training samples")
        log.info("linear probe: no val split, holding out %d of %d train samples (seed %d) for lr selection",
                 n_val, len(train_x), self.seed)
        return train_x[perm[n_val:]], train_y[perm[n_val:]], train_x[perm[:n_val]], train_y[perm[:n_val]]

    def _select(self, val_x: Tensor, val_y: Tensor, weight: Tensor, bias: Tensor,
                heads: list[tuple[str, float]]) -> tuple[int, float]:
        """(index, validation top-1) of the best head: validation data only, never test."""
        val_acc = self._accuracy(val_x, val_y, weight, bias, k=1)  # [L]
        # A diverged head (non-finite weights) can still produce an argmax; never select it.
        finite = (torch.isfinite(weight).flatten(1).all(1) & torch.isfinite(bias).all(1)).cpu()
        val_acc = torch.where(finite, val_acc, torch.full_like(val_acc, -1.0))
        best = int(val_acc.argmax())  # first (smallest lr, first recipe) wins ties: deterministic
        log.debug("linear probe val top-1 per head: %s",
                  ", ".join(f"{r} {lr:g}: {acc:.2f}" for (r, lr), acc in zip(heads, val_acc.tolist(), strict=True)))
        return best, float(val_acc[best])

    def _fit(self, x: Tensor, y: Tensor, num_classes: int, gen: torch.Generator,
             masks: Tensor | None) -> tuple[Tensor, Tensor, tuple[Tensor, Tensor] | None]:
        """Train all heads jointly; returns weight ``[L, D, C]``, bias ``[L, C]`` and, for
        ``norm=batchnorm``, the running (mean, var) ``[D]`` of the batch norm."""
        n, dim = x.shape
        num_heads = len(masks) if masks is not None else len(self.lrs)
        # Zero init: the problem is convex, so no symmetry to break, and it is exactly reproducible.
        weight = torch.zeros(num_heads, dim, num_classes, device=x.device, requires_grad=True)
        bias = torch.zeros(num_heads, num_classes, device=x.device, requires_grad=True)
        buf_w, buf_b = torch.zeros_like(weight), torch.zeros_like(bias)
        base_lr = torch.tensor(self.lrs, device=x.device).repeat(num_heads // len(self.lrs))
        bn = (torch.zeros(dim, device=x.device), torch.ones(dim, device=x.device)) if self.norm == "batchnorm" else None
        # half-cosine from each head's lr to 0 over all steps, after an optional linear warmup
        lr_factor = Cosine(1.0, 0.0, warmup_epochs=self.warmup_epochs).build(math.ceil(n / self.batch_size), self.epochs)
        step = 0
        for _ in range(self.epochs):
            perm = torch.randperm(n, generator=gen).to(x.device)
            for start in range(0, n, self.batch_size):
                idx = perm[start : start + self.batch_size]
                xb, yb = x[idx], y[idx]
                if bn is not None:
                    xb = _batch_norm(xb, *bn)
                w = weight if masks is None else weight * masks[:, :, None]  # grid: each head its columns
                logits = torch.einsum("bd,ldc->lbc", xb, w) + bias[:, None]
                # Sum of the per-head mean losses: heads share nothing, so each head's gradient is
                # exactly that of its own loss, as if trained alone.
                loss = F.cross_entropy(
                    logits.reshape(-1, num_classes), yb.repeat(num_heads), reduction="sum"
                ) / len(idx)
                g_w, g_b = torch.autograd.grad(loss, (weight, bias))
                with torch.no_grad():
                    self._step(weight, bias, g_w, g_b, buf_w, buf_b, base_lr * lr_factor[step])
                step += 1
        return weight.detach(), bias.detach(), bn

    def _step(self, weight: Tensor, bias: Tensor, g_w: Tensor, g_b: Tensor, buf_w: Tensor, buf_b: Tensor,
              lr: Tensor) -> None:
        """One SGD-with-momentum step (PyTorch convention: v = m v + g; p -= lr v) of every head,
        ``lr [L]``; LARS first rescales each head's weight gradient by its trust ratio."""
        if self.weight_decay:
            g_w = g_w.add(weight, alpha=self.weight_decay)
        if self.optimizer == "lars":  # MAE util/lars.py: weights (ndim > 1) only
            w_norm, g_norm = weight.flatten(1).norm(dim=1), g_w.flatten(1).norm(dim=1)
            trust = torch.where((w_norm > 0) & (g_norm > 0), LARS_TRUST * w_norm / g_norm, torch.ones_like(w_norm))
            g_w = g_w * trust.view(-1, 1, 1)
        buf_w.mul_(self.momentum).add_(g_w)
        buf_b.mul_(self.momentum).add_(g_b)
        weight.sub_(lr.view(-1, 1, 1) * buf_w)
        bias.sub_(lr.view(-1, 1) * buf_b)

    @torch.no_grad()
    def _accuracy(self, x: Tensor, y: Tensor, weight: Tensor, bias: Tensor, *, k: int, chunk: int = 4096) -> Tensor:
        """Top-k accuracy (percent) of every head, ``[L]`` on CPU; chunked over samples so the
        ``L x chunk x C`` logits bound memory (ImageNet val x 8 heads x 1000 classes is 1.6 GB)."""
        if len(x) == 0:
            return torch.full((len(weight),), float("nan"), dtype=torch.float64)
        y = y.to(x.device)
        correct = torch.zeros(len(weight), dtype=torch.int64, device=x.device)
        for i in range(0, len(x), chunk):
            logits = torch.einsum("bd,ldc->lbc", x[i : i + chunk], weight) + bias[:, None]
            correct += topk_correct(logits, y[i : i + chunk], k).sum(-1)  # logits [L, b, C] -> [L]
        return correct.cpu().double() * 100.0 / len(x)


@torch.no_grad()
def _batch_norm(x: Tensor, running_mean: Tensor, running_var: Tensor) -> Tensor:
    """``BatchNorm1d(affine=False, eps=1e-6)`` in training mode on ``x [B, D]``: normalise with
    the batch statistics and update the running ones in place (unbiased variance, as PyTorch)."""
    var, mean = torch.var_mean(x, dim=0, correction=0)
    unbiased = var * len(x) / max(len(x) - 1, 1)
    running_mean.lerp_(mean, BN_MOMENTUM)
    running_var.lerp_(unbiased, BN_MOMENTUM)
    return (x - mean) / (var + BN_EPS).sqrt()


def _column_masks(recipe: str, head_recipes: list[str], dim: int, lrs_per_recipe: int,
                  device: torch.device) -> Tensor | None:
    """``[L, D]`` 0/1 masks of the feature columns each head reads (``None``: all, one recipe).

    Features of ``recipe`` hold ``n + avgpool`` equal blocks ([CLS] of the oldest block first, the
    patch mean last); a head of a smaller recipe reads the last ``n`` [CLS] blocks and the mean."""
    if len(head_recipes) == 1:
        return None
    n_max, has_avg = RECIPES[recipe]
    width = dim // (n_max + int(has_avg))
    rows = []
    for r in head_recipes:
        n, avg = RECIPES[r]
        blocks = torch.zeros(n_max + int(has_avg), device=device)
        blocks[n_max - n : n_max] = 1.0
        if avg:
            blocks[n_max] = 1.0
        rows += [blocks.repeat_interleave(width)] * lrs_per_recipe
    return torch.stack(rows)
