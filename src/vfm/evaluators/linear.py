"""Linear probe on frozen features, with the learning rate selected on a validation split.

The linear-evaluation protocol of self-supervised pretraining (DINO, Caron et al. 2021,
facebookresearch/dino ``eval_linear.py``; MAE, He et al. 2022, ``main_linprobe.py``): a single
linear layer trained with SGD + momentum and a cosine schedule on top of the frozen encoder.
Like DINOv2 (Oquab et al. 2023, facebookresearch/dinov2 ``eval/linear.py``) we train a grid of
learning rates *at the same time*, as independent heads sharing every mini-batch, and keep the
head with the best validation accuracy; the test split is only used to report that head.

Two simplifications that make it cheap enough to run after every pretraining epoch: features are
pre-extracted once (no augmentation, as in DINOv2's linear eval), and they are standardised with
the training set's per-dimension mean/std, which makes one lr grid work across encoders whose
feature scales differ by orders of magnitude (the role of MAE's ``BatchNorm1d(affine=False)``
in front of its linear head).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from vfm.engine.schedules import Cosine
from vfm.evaluators.features import SplitFeatures
from vfm.evaluators.metrics import topk_correct
from vfm.evaluators.protocols import FrozenFeatureEvaluator

log = logging.getLogger(__name__)

# Log-spaced around the optimum of a standardised softmax regression; the ends are there so the
# best lr is an interior point for very easy / very hard feature sets.
DEFAULT_LRS: tuple[float, ...] = (1e-3, 3e-3, 1e-2, 3e-2, 0.1, 0.3, 1.0, 3.0)


class LinearProbe(FrozenFeatureEvaluator):
    """Softmax-regression probe, one head per learning rate, best head picked on validation.

    Args:
        lrs: learning-rate grid; one head per entry, all trained together on the same batches.
        epochs: passes over the training features.
        batch_size: mini-batch size.
        weight_decay: L2 penalty on the weights (not the bias), shared by all heads.
        momentum: SGD momentum.
        seed: seeds the mini-batch order and the validation carve-out.
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
        device: str | torch.device = "cpu",
    ) -> None:
        self.lrs = tuple(float(lr) for lr in lrs)  # Hydra passes a ListConfig
        if not self.lrs or min(self.lrs) <= 0:
            raise ValueError(f"lrs must be a non-empty list of positive numbers, got {self.lrs}")
        if epochs < 1:
            raise ValueError(f"epochs must be >= 1, got {epochs}")
        self.epochs = epochs
        self.batch_size = batch_size
        self.weight_decay = weight_decay
        self.momentum = momentum
        self.seed = seed
        self.device = device

    def __call__(self, features: SplitFeatures, num_classes: int) -> dict[str, float]:
        """Return ``linear/top1`` (+ ``linear/top5`` when ``num_classes >= 5``) on the test split
        for the head with the best validation accuracy, that accuracy as ``linear/val_top1`` and
        its learning rate as ``linear/best_lr``. Accuracies in percent. Without a test split only
        the validation keys are returned."""
        device = torch.device(self.device)
        gen = torch.Generator().manual_seed(self.seed)
        train_x, train_y = features.train_x, features.train_y
        val_x, val_y = features.val_x, features.val_y
        if val_x is None or val_y is None:
            # Hold out a seeded 10% of train so the lr is never chosen on test.
            perm = torch.randperm(len(train_x), generator=gen)
            n_val = max(1, len(train_x) // 10)
            if n_val >= len(train_x):
                raise ValueError("linear probe needs a val split or at least 2 training samples")
            val_x, val_y = train_x[perm[:n_val]], train_y[perm[:n_val]]
            train_x, train_y = train_x[perm[n_val:]], train_y[perm[n_val:]]
            log.info("linear probe: no val split, holding out %d of %d train samples (seed %d) for lr selection",
                     n_val, len(features.train_x), self.seed)
        for split, y in (("train", train_y), ("val", val_y), ("test", features.test_y)):
            if y is not None and ((y < 0).any() or (y >= num_classes).any()):
                raise ValueError(f"linear probe: {split} labels must lie in [0, {num_classes}) (missing labels are -1)")

        # Standardise with train statistics only (no peeking at val/test).
        std, mean = torch.std_mean(train_x.float(), dim=0)
        # Constant (e.g. dead) dimensions would divide by zero; a 1-sample train split has no std.
        std = torch.nan_to_num(std, nan=1.0).clamp_min(1e-6)

        def prep(x: Tensor) -> Tensor:
            return ((x.float() - mean) / std).to(device)

        weight, bias = self._fit(prep(train_x), train_y.to(device), num_classes, gen)

        val_acc = self._accuracy(prep(val_x), val_y, weight, bias, k=1)  # [L]
        # A diverged head (non-finite weights) can still produce an argmax; never select it.
        finite = (torch.isfinite(weight).flatten(1).all(1) & torch.isfinite(bias).all(1)).cpu()
        val_acc = torch.where(finite, val_acc, torch.full_like(val_acc, -1.0))
        best = int(val_acc.argmax())  # first (smallest) lr wins ties: deterministic
        log.debug(
            "linear probe val top-1 per lr: %s",
            ", ".join(f"{lr:g}: {acc:.2f}" for lr, acc in zip(self.lrs, val_acc.tolist(), strict=True)),
        )

        metrics = {"linear/val_top1": float(val_acc[best]), "linear/best_lr": self.lrs[best]}
        if features.test_x is not None and features.test_y is not None:
            head_w, head_b = weight[best : best + 1], bias[best : best + 1]
            test_x = prep(features.test_x)
            metrics["linear/top1"] = float(self._accuracy(test_x, features.test_y, head_w, head_b, k=1)[0])
            if num_classes >= 5:
                metrics["linear/top5"] = float(self._accuracy(test_x, features.test_y, head_w, head_b, k=5)[0])
        log.info(
            "linear probe (%d lrs, %d epochs, train=%d): best lr %g, %s", len(self.lrs), self.epochs, len(train_x),
            self.lrs[best], ", ".join(f"{k}={v:.2f}" for k, v in metrics.items() if k != "linear/best_lr"),
        )
        return metrics

    def _fit(self, x: Tensor, y: Tensor, num_classes: int, gen: torch.Generator) -> tuple[Tensor, Tensor]:
        """Train all heads jointly; returns weight ``[L, D, C]`` and bias ``[L, C]``."""
        n, dim = x.shape
        num_heads = len(self.lrs)
        # Zero init: the problem is convex, so no symmetry to break, and it is exactly reproducible.
        weight = torch.zeros(num_heads, dim, num_classes, device=x.device, requires_grad=True)
        bias = torch.zeros(num_heads, num_classes, device=x.device, requires_grad=True)
        buf_w, buf_b = torch.zeros_like(weight), torch.zeros_like(bias)
        base_lr = torch.tensor(self.lrs, device=x.device)
        # half-cosine from each head's lr to 0 over all steps, no warmup
        lr_factor = Cosine(1.0, 0.0).build(math.ceil(n / self.batch_size), self.epochs)
        step = 0
        for _ in range(self.epochs):
            perm = torch.randperm(n, generator=gen).to(x.device)
            for start in range(0, n, self.batch_size):
                idx = perm[start : start + self.batch_size]
                xb, yb = x[idx], y[idx]
                logits = torch.einsum("bd,ldc->lbc", xb, weight) + bias[:, None]
                # Sum of the per-head mean losses: heads share nothing, so each head's gradient is
                # exactly that of its own loss, as if trained alone.
                loss = F.cross_entropy(
                    logits.reshape(-1, num_classes), yb.repeat(num_heads), reduction="sum"
                ) / len(idx)
                g_w, g_b = torch.autograd.grad(loss, (weight, bias))
                with torch.no_grad():
                    # SGD with momentum (PyTorch convention: v = m v + g; p -= lr v), cosine lr per head.
                    lr = base_lr * lr_factor[step]
                    if self.weight_decay:
                        g_w = g_w.add(weight, alpha=self.weight_decay)
                    buf_w.mul_(self.momentum).add_(g_w)
                    buf_b.mul_(self.momentum).add_(g_b)
                    weight.sub_(lr.view(-1, 1, 1) * buf_w)
                    bias.sub_(lr.view(-1, 1) * buf_b)
                step += 1
        return weight.detach(), bias.detach()

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
