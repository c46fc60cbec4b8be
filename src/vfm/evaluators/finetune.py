"""End-to-end (full) fine-tuning of a pretrained encoder with a new linear classifier.

The protocol is the fine-tuning recipe of MAE (He et al., "Masked Autoencoders Are Scalable
Vision Learners", CVPR 2022, Appendix A.1; facebookresearch/mae ``main_finetune.py``,
``util/lr_decay.py`` and ``util/lr_sched.py``), itself built on

* BEiT's layer-wise learning-rate decay (Bao et al., "BEiT: BERT Pre-Training of Image
  Transformers", ICLR 2022): block ``i`` of a depth-``L`` ViT trains with
  ``lr * layer_decay ** (L - i)``, the embeddings with ``layer_decay ** (L + 1)`` and the head at
  the full ``lr``, so the low-level layers move least;
* DeiT's regularisation (Touvron et al., "Training data-efficient image transformers &
  distillation through attention", ICML 2021): mixup + cutmix (timm ``Mixup``), label smoothing,
  stochastic depth (drop path), AdamW with a cosine schedule after a linear warmup.

What this implementation does, per call:

1. deep-copies the encoder (the caller's module is never touched), makes every parameter of the
   copy trainable, sets its stochastic-depth rates linearly over depth up to ``drop_path`` (timm's
   rule) and puts ``nn.Linear(dim, num_classes)`` on its global feature (weights trunc-normal with
   std 2e-5, bias 0: MAE's ``head`` init). MAE fine-tunes on global-average-pooled patch tokens +
   ``fc_norm``; we keep the encoder's own global feature (the [CLS] token after the final norm for
   our ViTs, the pooled feature for CNNs) so any ``Backbone`` or plain timm model works unchanged;
2. trains with AdamW (betas 0.9, 0.999) on :func:`layer_decay_param_groups`, the lr
   ``blr * batch / 256`` following MAE's per-iteration schedule (linear warmup, then half-cosine
   to ``min_lr``), each group scaled by its ``lr_scale``;
3. augments the uint8 training images batched on tensors: random resized crop (``crop_scale``) to
   ``img_size`` + horizontal flip (MAE also uses RandAugment and random erasing; left out here to
   stay cheap on CPU), then mixup/cutmix with soft-target cross-entropy, or plain cross-entropy
   with label smoothing when both mixup and cutmix are off (as ``main_finetune.py``);
4. evaluates top-1 on ``splits.val`` after every epoch and keeps the best epoch's weights (model
   selection on validation; a seeded 10% of train is held out when there is no val split). MAE
   reports the best accuracy on ImageNet-val, which is its test set; we never select on test:
   ``splits.test`` is evaluated exactly once, with the selected weights.

Defaults are CPU-friendly (5 epochs); the MAE ViT-B/16 ImageNet values are given in comments and
in ``conf/evaluator/finetune.yaml``. Runs are reproducible: shuffling, augmentation, mixup and
drop path all draw from streams seeded by ``seed``, and the caller's global torch / numpy RNG
states are restored afterwards (a pretraining run calling this evaluator is not perturbed).

**Resume.** With ``checkpoint_dir``, the state after every epoch (classifier, optimizer, selection
so far, a fingerprint of the settings and of the encoder's weights) is written atomically to
``<checkpoint_dir>/last.pt``; a later call with the same directory continues from the next epoch,
or only tests the selected weights when every epoch is done, and refuses a checkpoint written with
other settings. No RNG state has to travel in it: every random stream is re-derived from
``(seed, epoch[, batch, rank])`` (epoch order, crops, mixup, drop path), so an interrupted and
resumed run is bitwise the uninterrupted one (fp32; bf16 too on a deterministic backend).
``stop_after_epoch`` stops a run early (:class:`FineTuneInterrupted`), for tests and time-boxed jobs.

**Data parallel.** Under ``torchrun`` (``torch.distributed`` initialised, world size > 1) the
classifier is wrapped in ``DistributedDataParallel`` and every global batch of ``batch_size``
images is cut into contiguous per-process slices (``batch_size`` must divide evenly). The crops
of a slice are exactly those rows of the single-process global batch (parameters drawn for the
whole batch, see ``MultiCropAugmentation(of_batch=, start=)``), so without mixup and drop path
the gradients are those of one process up to float summation order. Mixup / cutmix runs on each
process's slice with the batch's lambda (same seed on every process), pairing images within the
slice; drop path draws per process. Val and test are sharded across processes and the counts
summed, so every process selects the same epoch and returns the same metrics; only rank 0 writes
the checkpoint. BatchNorm is not converted to ``SyncBatchNorm``: a CNN normalises with
per-process batch statistics and keeps rank 0's running statistics (broadcast after every epoch),
as timm / torchvision recipes without ``--sync-bn``.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import logging
import math
import re
from collections.abc import Iterator
from collections.abc import Set as AbstractSet
from pathlib import Path
from typing import Any

import numpy as np
import torch
from timm.data import Mixup
from timm.layers import DropPath
from timm.loss import SoftTargetCrossEntropy
from torch import Tensor, nn
from torch.utils.data import Dataset, Subset
from tqdm.auto import tqdm

from vfm import distributed as vdist
from vfm.data.datasets import DataSplits, TensorImageDataset
from vfm.data.loader import batch_seed, build_eval_loader
from vfm.data.transforms import MultiCropAugmentation, normalize
from vfm.engine.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from vfm.evaluators.protocols import TrainsEncoderEvaluator

__all__ = ["CHECKPOINT_NAME", "FineTune", "FineTuneInterrupted", "layer_decay_param_groups", "set_drop_path"]

log = logging.getLogger(__name__)

# Parameters that never get weight decay besides 1-D ones and biases: position embedding and the
# learnable tokens (timm's VisionTransformer.no_weight_decay() + registers and our mask token).
NO_WEIGHT_DECAY: frozenset[str] = frozenset({"pos_embed", "cls_token", "dist_token", "reg_token", "mask_token"})
# Parameters of the "embedding" layer (layer id 0), matched on the ViT-relative name.
_EMBED_RE = re.compile(r"^(cls_token|pos_embed|reg_token|dist_token|mask_token|patch_embed\.)")
_BLOCK_RE = re.compile(r"^blocks\.(\d+)\.")
_PRECISIONS = ("fp32", "bf16")
# The file written in ``checkpoint_dir`` after every epoch, and its format tag.
CHECKPOINT_NAME = "last.pt"
_CKPT_FORMAT = "vfm.finetune/1"
# Stream ids (the last coordinate of ``batch_seed``) of the independent random streams.
_CROP_STREAM, _MIXUP_STREAM, _ORDER_STREAM, _DROP_PATH_STREAM = 0, 1, 2, 3


class FineTuneInterrupted(RuntimeError):
    """Raised when a run stops at ``stop_after_epoch`` before its last epoch; the state of that
    epoch is in ``path``, and a call with the same ``checkpoint_dir`` resumes from it."""

    def __init__(self, epoch: int, epochs: int, stop_after_epoch: int, path: Path) -> None:
        super().__init__(
            f"finetune stopped after epoch {epoch}/{epochs} (stop_after_epoch={stop_after_epoch}); its state is "
            f"in {path}: call again with the same checkpoint_dir and a later (or no) stop_after_epoch to resume"
        )
        self.epoch, self.epochs, self.path = epoch, epochs, path


def _find_vit(model: nn.Module) -> tuple[str, nn.Module] | None:
    """``(name prefix, module)`` of the first timm-style ViT inside ``model`` (itself included):
    a module with ``patch_embed`` and a sequence of ``blocks``. Duck-typed so it finds the ViT
    behind a ``Backbone`` (``model.``), behind our classifier wrapper (``encoder.model.``), or a
    plain timm model (``""``)."""
    for name, module in model.named_modules():
        blocks = getattr(module, "blocks", None)
        if hasattr(module, "patch_embed") and isinstance(blocks, (nn.Sequential, nn.ModuleList)):
            return (f"{name}." if name else ""), module
    return None


def _no_decay(name: str, param: Tensor, names: AbstractSet[str]) -> bool:
    # Norm scales and biases are 1-D; decaying them (or the position embedding / tokens) only
    # shrinks them towards zero without regularising capacity (MAE / BEiT / DeiT convention).
    leaf = name.rsplit(".", 1)[-1]
    return param.ndim <= 1 or name.endswith(".bias") or leaf in names or name in names


def layer_decay_param_groups(
    model: nn.Module,
    *,
    base_lr: float,
    weight_decay: float,
    layer_decay: float,
    no_weight_decay: AbstractSet[str] = NO_WEIGHT_DECAY,
) -> list[dict[str, Any]]:
    """Optimizer parameter groups with BEiT/MAE layer-wise lr decay (MAE ``param_groups_lrd``).

    For a timm ``VisionTransformer`` with ``L = len(blocks)`` (found anywhere inside ``model``: a
    ``Backbone``, a classifier wrapping one, or the plain timm model), every trainable parameter
    gets a layer id: 0 for ``cls_token``, ``pos_embed``, ``reg_token``, ``mask_token`` and
    ``patch_embed.*``; ``i + 1`` for ``blocks.i.*``; ``L + 1`` for everything else (final norm,
    ``fc_norm``, the classification head, even when it lives outside the ViT). Its lr scale is
    ``layer_decay ** (L + 1 - layer_id)``. Parameters are split into one group per (layer id,
    decay / no decay); no weight decay for 1-D parameters, biases and names in
    ``no_weight_decay`` (matched on the last name component or the full name).

    Models without ViT blocks (ResNets, ...) have no meaningful layer order here, so they fall
    back to two groups, decay and no decay, both with ``lr_scale`` 1 and ``layer_id`` 0.

    Frozen parameters (``requires_grad=False``) are left out. Each group is a dict with
    ``params``, ``param_names``, ``lr_scale``, ``lr`` (``base_lr * lr_scale``), ``weight_decay``,
    ``layer_id`` and ``name``; empty groups are dropped. Groups are ordered by layer id.
    """
    found = _find_vit(model)
    names = set(no_weight_decay)
    if found is not None:
        prefix, vit = found
        num_layers = len(vit.blocks)
        # timm's own list (pos_embed, cls_token, dist_token) too, as MAE's main_finetune does.
        nwd = getattr(vit, "no_weight_decay", None)
        if callable(nwd):
            names |= set(nwd())
    else:
        prefix, num_layers = "", 0

    groups: dict[tuple[int, bool], dict[str, Any]] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if found is None:
            layer_id, scale = 0, 1.0
        else:
            rel = name[len(prefix):] if name.startswith(prefix) else None
            block = _BLOCK_RE.match(rel) if rel is not None else None
            if (rel is not None and _EMBED_RE.match(rel)) or name.rsplit(".", 1)[-1] == "mask_token":
                layer_id = 0  # the Backbone's mask_token sits next to (not inside) the timm model
            elif block is not None:
                layer_id = int(block.group(1)) + 1
            else:
                layer_id = num_layers + 1
            scale = layer_decay ** (num_layers + 1 - layer_id)
        skip_wd = _no_decay(name, param, names)
        key = (layer_id, skip_wd)
        if key not in groups:
            tag = "no_decay" if skip_wd else "decay"
            groups[key] = {
                "params": [],
                "param_names": [],
                "lr_scale": scale,
                "lr": base_lr * scale,
                "weight_decay": 0.0 if skip_wd else weight_decay,
                "layer_id": layer_id,
                "name": f"layer_{layer_id}_{tag}" if found is not None else tag,
            }
        groups[key]["params"].append(param)
        groups[key]["param_names"].append(name)
    return [groups[k] for k in sorted(groups)]


def set_drop_path(model: nn.Module, rate: float) -> list[float]:
    """Set stochastic depth on ``model`` in place, linearly from 0 (first block) to ``rate``
    (last block), timm's decay rule (``torch.linspace(0, rate, depth)``, as its ViTs and ResNets
    build it). Returns the per-block rates.

    Residual blocks are the modules with ``drop_path1`` / ``drop_path2`` (timm ViT, Swin, ...) or
    ``drop_path`` (ResNet, ConvNeXt, ...) slots, in module order. A slot is replaced by a
    ``DropPath`` of the block's rate, because timm builds ``nn.Identity`` (ViT) or ``None``
    (ResNet) when the model was created with ``drop_path_rate=0`` and there is no ``drop_prob``
    to set.
    """
    slots = ("drop_path", "drop_path1", "drop_path2")
    blocks = [
        m for m in model.modules()
        if not isinstance(m, DropPath)
        and any(hasattr(m, s) and (getattr(m, s) is None or isinstance(getattr(m, s), (nn.Identity, DropPath))) for s in slots)
    ]
    rates = [x.item() for x in torch.linspace(0, rate, len(blocks))]
    for block, r in zip(blocks, rates, strict=True):
        for s in slots:
            if hasattr(block, s) and (getattr(block, s) is None or isinstance(getattr(block, s), (nn.Identity, DropPath))):
                setattr(block, s, DropPath(r))
    return rates


def _feature_dim(encoder: nn.Module) -> int:
    # Backbone has .embed_dim (== its timm model's num_features); plain timm models (CNNs and
    # ViTs loaded by load_exported) have .num_features.
    for attr in ("embed_dim", "num_features"):
        value = getattr(encoder, attr, None)
        if isinstance(value, int) and value > 0:
            return value
    raise ValueError(
        f"fine-tuning needs the encoder's feature size: {type(encoder).__name__} has neither .embed_dim nor .num_features"
    )


class FineTuneClassifier(nn.Module):
    """``head(encoder(x))``: the fine-tuned network (encoder copy + linear head)."""

    def __init__(self, encoder: nn.Module, num_classes: int) -> None:
        super().__init__()
        self.encoder = encoder
        self.head = nn.Linear(_feature_dim(encoder), num_classes)
        # MAE: trunc_normal_(head.weight, std=2e-5): a near-zero head keeps the first gradients
        # from wrecking the pretrained features while the head is still random.
        nn.init.trunc_normal_(self.head.weight, std=2e-5)
        nn.init.zeros_(self.head.bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.encoder(x))


@contextlib.contextmanager
def _numpy_seed(seed: int) -> Iterator[None]:
    """Seed numpy's global RNG (timm's Mixup draws lambda / boxes from it) for one block, then
    restore the caller's state."""
    state = np.random.get_state()
    np.random.seed(seed & 0xFFFFFFFF)
    try:
        yield
    finally:
        np.random.set_state(state)


def _labels_of(dataset: Dataset) -> Tensor:
    labels = getattr(dataset, "labels", None)
    if isinstance(labels, Tensor) and len(labels) == len(dataset):  # type: ignore[arg-type]
        return labels.to(torch.int64)
    # Generic datasets: read every label once (decodes the images; fine for small sets).
    return torch.tensor([int(dataset[i][1]) for i in range(len(dataset))], dtype=torch.int64)  # type: ignore[arg-type]


def _fetch(dataset: Dataset, idx: Tensor) -> Tensor:
    """uint8 images ``[B, C, H, W]`` of ``dataset`` at ``idx``."""
    images = getattr(dataset, "images", None)
    if isinstance(images, Tensor):
        return images[idx]  # in-memory fast path: one gather, no per-item Python
    return torch.stack([dataset[int(i)][0] for i in idx])


def _subset(dataset: Dataset, idx: Tensor) -> Dataset:
    if isinstance(dataset, TensorImageDataset):
        return TensorImageDataset(dataset.images[idx], dataset.labels[idx])
    return Subset(dataset, idx.tolist())


def _weights_digest(module: nn.Module) -> str:
    """SHA-1 of ``module``'s state (names, dtypes, shapes, bytes): tells a checkpoint fine-tuned
    from other weights of the same architecture (e.g. a longer pretraining run) from ours."""
    h = hashlib.sha1()
    for name, t in module.state_dict().items():
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()


class FineTune(TrainsEncoderEvaluator):
    """Full fine-tuning evaluator (MAE recipe, see the module docstring); best epoch chosen on val.

    Unlike the kNN / linear evaluators it trains the encoder itself, so it is called with the
    encoder and the data splits rather than with frozen features (``needs_encoder = True``).

    Args:
        epochs: training epochs (MAE ViT-B: 100).
        batch_size: images per step (MAE: 1024 = 32 x 32 GPUs).
        blr: base lr; the lr is ``blr * batch / 256`` (MAE ViT-B: 5e-4).
        min_lr: floor of the cosine schedule (MAE: 1e-6).
        warmup_epochs: linear warmup, in epochs, may be fractional (MAE: 5).
        weight_decay: AdamW weight decay (MAE: 0.05).
        layer_decay: layer-wise lr decay (MAE: 0.65 for ViT-B, 0.75 for ViT-L/H).
        drop_path: stochastic depth rate of the last block (MAE ViT-B: 0.1).
        label_smoothing: (MAE: 0.1).
        mixup, cutmix: Beta-distribution alphas; both 0 disables mixing (MAE: 0.8, 1.0).
        mixup_prob: probability of mixing a batch (MAE: 1.0).
        mixup_switch_prob: probability of cutmix instead of mixup when both are on (MAE: 0.5).
        crop_scale: area range of the random resized crop (MAE: (0.08, 1.0)).
        flip_p: horizontal flip probability (MAE: 0.5).
        seed: seeds shuffling, augmentation, mixup, head init and drop path.
        precision: "bf16" (autocast of the forward, also on CPU) or "fp32".
        device: where to train; overridden by ``__call__(device=...)``.
        progress: show a tqdm bar.
        select_on: "val" keeps the epoch with the best validation top-1 (a seeded 10% of train is
            held out when the splits have no val); "last" keeps the final weights.
        stop_after_epoch: stop (raise :class:`FineTuneInterrupted`) once this many epochs are done
            and saved, before the last one; a later call with the same ``checkpoint_dir`` resumes.
            For tests and time-boxed jobs; needs ``checkpoint_dir``. ``None``: run to the end.
    """

    needs_encoder = True

    def __init__(
        self,
        epochs: int = 5,
        batch_size: int = 256,
        blr: float = 5e-4,
        min_lr: float = 1e-6,
        warmup_epochs: float = 1.0,
        weight_decay: float = 0.05,
        layer_decay: float = 0.75,
        drop_path: float = 0.1,
        label_smoothing: float = 0.1,
        mixup: float = 0.8,
        cutmix: float = 1.0,
        mixup_prob: float = 1.0,
        mixup_switch_prob: float = 0.5,
        crop_scale: tuple[float, float] = (0.08, 1.0),
        flip_p: float = 0.5,
        seed: int = 0,
        precision: str = "bf16",
        device: str = "cpu",
        progress: bool = True,
        select_on: str = "val",
        stop_after_epoch: int | None = None,
    ) -> None:
        if epochs < 1:
            raise ValueError(f"finetune.epochs must be >= 1, got {epochs}")
        if batch_size < 2:
            raise ValueError(f"finetune.batch_size must be >= 2, got {batch_size}")
        if blr <= 0 or min_lr < 0:
            raise ValueError(f"finetune.blr must be > 0 and min_lr >= 0, got {blr}, {min_lr}")
        if warmup_epochs < 0:
            raise ValueError(f"finetune.warmup_epochs must be >= 0, got {warmup_epochs}")
        if not 0 < layer_decay <= 1:
            raise ValueError(f"finetune.layer_decay must be in (0, 1], got {layer_decay}")
        if not 0 <= drop_path < 1:
            raise ValueError(f"finetune.drop_path must be in [0, 1), got {drop_path}")
        if not 0 <= label_smoothing < 1:
            raise ValueError(f"finetune.label_smoothing must be in [0, 1), got {label_smoothing}")
        if mixup < 0 or cutmix < 0:
            raise ValueError(f"finetune.mixup / cutmix must be >= 0, got {mixup}, {cutmix}")
        if precision not in _PRECISIONS:
            raise ValueError(f"finetune.precision must be one of {_PRECISIONS}, got {precision!r}")
        if select_on not in ("val", "last"):
            raise ValueError(f"finetune.select_on must be 'val' or 'last', got {select_on!r}")
        if stop_after_epoch is not None and stop_after_epoch < 1:
            raise ValueError(f"finetune.stop_after_epoch must be >= 1 or None, got {stop_after_epoch}")
        self.epochs = int(epochs)
        self.batch_size = int(batch_size)
        self.blr, self.min_lr = float(blr), float(min_lr)
        self.warmup_epochs = float(warmup_epochs)
        self.weight_decay = float(weight_decay)
        self.layer_decay = float(layer_decay)
        self.drop_path = float(drop_path)
        self.label_smoothing = float(label_smoothing)
        self.mixup, self.cutmix = float(mixup), float(cutmix)
        self.mixup_prob, self.mixup_switch_prob = float(mixup_prob), float(mixup_switch_prob)
        self.crop_scale = (float(crop_scale[0]), float(crop_scale[1]))  # Hydra passes a ListConfig
        self.flip_p = float(flip_p)
        self.seed = int(seed)
        self.precision = precision
        self.device = device
        self.progress = progress
        self.select_on = select_on
        self.stop_after_epoch = None if stop_after_epoch is None else int(stop_after_epoch)
        self._rank, self._world = 0, 1  # this call's place in the process group, set by __call__

    # ------------------------------------------------------------------------------------------

    def build_model(self, encoder: nn.Module, num_classes: int) -> FineTuneClassifier:
        """The network that gets trained: a deep copy of ``encoder`` (all parameters trainable,
        drop path set) plus a fresh linear head. Uses the global torch RNG for the head init, so
        seed it first (``__call__`` does)."""
        if num_classes < 1:
            raise ValueError(f"fine-tuning needs a labelled dataset, got num_classes={num_classes}")
        enc = copy.deepcopy(encoder)
        # Full fine-tuning: parameters frozen during pretraining (e.g. MAE's fixed sin-cos
        # position embedding) are trained too, as MAE loads them into a learnable pos_embed.
        enc.requires_grad_(True)
        set_drop_path(enc, self.drop_path)
        return FineTuneClassifier(enc, num_classes)

    def lr_at(self, peak_lr: float, epoch: float) -> float:
        """MAE ``util/lr_sched.adjust_learning_rate``: linear warmup, then half-cosine to min_lr;
        ``epoch`` is fractional (per-iteration schedule)."""
        if epoch < self.warmup_epochs:
            return peak_lr * epoch / self.warmup_epochs
        span = max(self.epochs - self.warmup_epochs, 1e-12)
        progress = min((epoch - self.warmup_epochs) / span, 1.0)
        return self.min_lr + (peak_lr - self.min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))

    def _autocast(self, device: torch.device) -> contextlib.AbstractContextManager:
        if self.precision == "bf16":
            return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    @torch.no_grad()
    def _evaluate(
        self, model: nn.Module, dataset: Dataset, splits: DataSplits, device: torch.device, *, desc: str
    ) -> tuple[float, float]:
        """Top-1 and top-5 accuracy (percent) on the labelled samples of ``dataset``: full image
        (centre-cropped to ``img_size`` when stored larger), normalised, no augmentation.

        Under DDP each process scores every ``world``-th sample and the counts are summed, so all
        processes get the same numbers (and select the same epoch). ``model`` is the bare module,
        not the DDP wrapper: shards may differ in length, and a DDP forward would run a collective
        (the buffer broadcast) per batch."""
        rank, world = self._rank, self._world
        if world > 1:
            dataset = _subset(dataset, torch.arange(rank, len(dataset), world))  # type: ignore[arg-type]
        model.eval()
        correct1 = correct5 = total = 0
        if len(dataset) > 0:  # type: ignore[arg-type]
            loader = build_eval_loader(dataset, batch_size=self.batch_size)
            for images, labels in tqdm(loader, desc=desc, disable=not self.progress or rank != 0, leave=False):
                keep = labels >= 0  # unlabelled samples (-1) cannot be scored
                if not bool(keep.any()):
                    continue
                x = normalize(images[keep].to(device), splits.mean, splits.std, crop_size=splits.img_size)
                y = labels[keep].to(device)
                with self._autocast(device):
                    logits = model(x)
                top = logits.float().topk(min(5, logits.shape[1]), dim=1).indices
                correct1 += int((top[:, 0] == y).sum())
                correct5 += int((top == y[:, None]).any(1).sum())
                total += len(y)
        if world > 1:
            counts = vdist.all_reduce_sum(torch.tensor([correct1, correct5, total], dtype=torch.int64, device=device))
            correct1, correct5, total = (int(c) for c in counts.tolist())
        if total == 0:
            return float("nan"), float("nan")
        return 100.0 * correct1 / total, 100.0 * correct5 / total

    def __call__(
        self,
        encoder: nn.Module,
        splits: DataSplits,
        *,
        device: str | None = None,
        checkpoint_dir: str | Path | None = None,
        distributed: bool = True,
    ) -> dict[str, float]:
        """Fine-tune a copy of ``encoder`` on ``splits.train`` and return, in percent,
        ``finetune/val_top1`` (selected epoch), ``finetune/best_epoch`` (1-based),
        ``finetune/train_loss`` (mean over the last epoch) and, when there is a test split,
        ``finetune/top1`` (+ ``finetune/top5`` when ``num_classes >= 5``, as the linear probe)
        of the selected weights.

        ``checkpoint_dir``: save the state to ``<checkpoint_dir>/last.pt`` after every epoch and
        resume from it when it exists (see the module docstring); a file written with other
        settings or another encoder raises :class:`~vfm.engine.checkpoint.CheckpointError`.
        Under DDP it must be on a file system every process sees (rank 0 writes, all read).

        ``distributed``: with an initialised process group of several processes, every process
        must make this call and they train together (DDP). ``False`` trains in this process
        alone, for callers that evaluate on one rank only (``pretrain``'s rank-0 evaluation)."""
        dev = torch.device(device if device is not None else self.device)
        if dev.type == "cuda" and dev.index is None:
            dev = torch.device("cuda", torch.cuda.current_device())
        ckpt = Path(checkpoint_dir) / CHECKPOINT_NAME if checkpoint_dir is not None else None
        # Read by _run and _evaluate; (0, 1) makes every collective a no-op.
        self._rank, self._world = (vdist.get_rank(), vdist.get_world_size()) if distributed else (0, 1)
        if self.stop_after_epoch is not None and ckpt is None:
            raise ValueError("finetune.stop_after_epoch needs a checkpoint_dir: stopping early without saving "
                             "would throw the training away")
        # Private RNG streams: the head init and drop path use the global torch RNG, which must be
        # seeded for reproducibility but restored so a pretraining run calling us is unaffected.
        fork_devices = [dev.index] if dev.type == "cuda" else []
        with torch.random.fork_rng(devices=fork_devices):
            torch.manual_seed(self.seed)
            return self._run(encoder, splits, dev, ckpt)

    def _fingerprint(self, encoder: nn.Module, **extra: Any) -> dict[str, Any]:
        """Everything that shapes the training trajectory: a checkpoint is resumed only when this
        is equal. (The process count is not in it: resuming on another count is allowed, it only
        changes per-process mixup pairing / drop path draws from then on.)"""
        return {
            "epochs": self.epochs, "blr": self.blr, "min_lr": self.min_lr, "warmup_epochs": self.warmup_epochs,
            "weight_decay": self.weight_decay, "layer_decay": self.layer_decay, "drop_path": self.drop_path,
            "label_smoothing": self.label_smoothing, "mixup": self.mixup, "cutmix": self.cutmix,
            "mixup_prob": self.mixup_prob, "mixup_switch_prob": self.mixup_switch_prob,
            "crop_scale": list(self.crop_scale), "flip_p": self.flip_p, "seed": self.seed,
            "precision": self.precision, "select_on": self.select_on,
            "encoder_params": sum(p.numel() for p in encoder.parameters()),
            "encoder_digest": _weights_digest(encoder),
            **extra,
        }

    @staticmethod
    def _load_state(path: Path, fingerprint: dict[str, Any]) -> dict[str, Any]:
        state = load_checkpoint(path)
        if not isinstance(state, dict) or state.get("format") != _CKPT_FORMAT:
            raise CheckpointError(f"{path} is not a fine-tuning checkpoint ({_CKPT_FORMAT}); delete it or use "
                                  f"another checkpoint_dir")
        saved = state.get("fingerprint", {})
        diffs = [f"{k}: {saved.get(k)!r} in the checkpoint, {v!r} now" for k, v in fingerprint.items() if saved.get(k) != v]
        if diffs:
            raise CheckpointError(
                f"refusing to resume fine-tuning from {path}: it was written with other settings or another "
                f"encoder ({'; '.join(diffs)}). Delete {path} to start over, or use another checkpoint_dir "
                f"(run directory)"
            )
        return state

    def _run(self, encoder: nn.Module, splits: DataSplits, device: torch.device, ckpt: Path | None) -> dict[str, float]:
        num_classes = int(splits.num_classes)
        rank, world = self._rank, self._world

        # Training set: labelled samples only (e.g. STL-10's train split mixes in unlabelled ones).
        train_ds: Dataset = splits.train
        labels = _labels_of(train_ds)
        labelled = (labels >= 0).nonzero().squeeze(1)
        if len(labelled) < len(labels):
            log.info("finetune: dropping %d unlabelled training samples", len(labels) - len(labelled))
            train_ds, labels = _subset(train_ds, labelled), labels[labelled]
        if bool((labels >= num_classes).any()):
            raise ValueError(f"finetune: train labels reach {int(labels.max())} but num_classes={num_classes}")

        val_ds = splits.val
        if val_ds is None and self.select_on == "val":
            # Hold out a seeded 10% of train so the epoch is never chosen on test (as the linear probe).
            perm = torch.randperm(len(labels), generator=torch.Generator().manual_seed(self.seed))
            n_val = max(1, len(labels) // 10)
            if n_val >= len(labels):
                raise ValueError("finetune needs a val split or at least 2 labelled training samples")
            val_ds = _subset(train_ds, perm[:n_val].sort().values)
            keep = perm[n_val:].sort().values
            train_ds, labels = _subset(train_ds, keep), labels[keep]
            log.info("finetune: no val split, holding out %d training samples (seed %d) for model selection",
                     n_val, self.seed)

        n = len(labels)
        mixing = self.mixup > 0 or self.cutmix > 0
        if world > 1 and (self.batch_size % world or (mixing and (self.batch_size // world) % 2)):
            even = " into an even number of images per process (mixup pairs images within a process)" if mixing else ""
            unit = world * (2 if mixing else 1)
            raise ValueError(
                f"finetune.batch_size={self.batch_size} (the global batch) does not split over {world} processes"
                f"{even}; use a multiple of {unit}, e.g. finetune.batch_size={unit * max(1, self.batch_size // unit)}"
            )
        # timm's Mixup pairs each sample with its mirror in the (per-process) batch: even slices.
        unit = world * (2 if mixing else 1)
        batch = min(self.batch_size, n)
        batch -= batch % unit
        if batch == 0:
            raise ValueError(f"finetune: {n} labelled training samples are too few for a batch"
                             + (f" of {unit} over {world} processes" if world > 1 else ""))
        per = batch // world
        lo = rank * per  # this process's rows of every global batch
        steps = n // batch  # drop_last, as MAE's training loader: every step sees a full batch
        peak_lr = self.blr * batch / 256  # linear scaling rule (Goyal et al. 2017), as MAE

        fingerprint = None
        if ckpt is not None:  # before build_model: the digest is of the caller's encoder
            fingerprint = self._fingerprint(
                encoder, batch=batch, num_classes=num_classes, train_samples=n,
                val_samples=0 if val_ds is None else len(val_ds),  # type: ignore[arg-type]
            )
        model = self.build_model(encoder, num_classes).to(device)
        groups = layer_decay_param_groups(
            model, base_lr=peak_lr, weight_decay=self.weight_decay, layer_decay=self.layer_decay
        )
        optimizer = torch.optim.AdamW(groups, lr=peak_lr, betas=(0.9, 0.999))
        augment = MultiCropAugmentation(
            n_global=1, n_local=0, global_crop_size=splits.img_size, local_crop_size=splits.img_size,
            global_scale=self.crop_scale, flip_p=self.flip_p, color_jitter_p=0.0, grayscale_p=0.0,
            blur_p=(0.0, 0.0, 0.0), solarize_p=(0.0, 0.0, 0.0), mean=splits.mean, std=splits.std,
        )
        mixup_fn = Mixup(
            mixup_alpha=self.mixup, cutmix_alpha=self.cutmix, prob=self.mixup_prob,
            switch_prob=self.mixup_switch_prob, label_smoothing=self.label_smoothing, num_classes=num_classes,
        ) if mixing else None
        # Mixup already smooths its soft targets; without it, smoothing goes into the CE (MAE).
        criterion: nn.Module = SoftTargetCrossEntropy() if mixing else nn.CrossEntropyLoss(label_smoothing=self.label_smoothing)

        start_epoch = 0
        best_top1, best_epoch, best_state = -math.inf, 0, None
        val_hist: list[float] = []
        train_loss = float("nan")
        if ckpt is not None and ckpt.is_file():
            assert fingerprint is not None
            state = self._load_state(ckpt, fingerprint)
            model.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
            start_epoch = int(state["epoch"])
            best_top1, best_epoch = float(state["best_top1"]), int(state["best_epoch"])
            best_state = state["best_state"]
            if state["best_is_last"]:  # saved once: the selected epoch was the last one done
                best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
            val_hist, train_loss = list(state["val_hist"]), float(state["train_loss"])
            log.info("finetune: resuming from %s after epoch %d/%d%s", ckpt, start_epoch, self.epochs,
                     f" (written by {state['world_size']} process(es), now {world})" if state["world_size"] != world else "")
        if world > 1:
            # Every process must start from the same epoch: a checkpoint_dir that only some
            # processes see (no shared file system) would desynchronise the collectives.
            starts = vdist.all_gather(torch.tensor([start_epoch], device=device))
            if not bool((starts == start_epoch).all()):
                raise CheckpointError(
                    f"processes found different fine-tuning checkpoints in {ckpt} (epochs done: {starts.tolist()}); "
                    "checkpoint_dir must be on a file system shared by all processes"
                )
            # static_graph: the graph is the same every step, and parameters the forward never
            # uses (e.g. a mask token left trainable by requires_grad_(True)) are then allowed.
            net: nn.Module = nn.parallel.DistributedDataParallel(
                model, device_ids=[device.index] if device.type == "cuda" else None, static_graph=True
            )
        else:
            net = model

        def save(epochs_done: int) -> None:
            if ckpt is None:
                return
            if rank == 0:
                best_is_last = best_state is not None and best_epoch == epochs_done
                save_checkpoint({
                    "format": _CKPT_FORMAT, "fingerprint": fingerprint, "epoch": epochs_done, "world_size": world,
                    "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                    "best_top1": best_top1, "best_epoch": best_epoch, "best_is_last": best_is_last,
                    # the selected weights, unless they are the current ones: no second copy then
                    "best_state": None if best_is_last else best_state,
                    "val_hist": val_hist, "train_loss": train_loss,
                }, ckpt)
            if world > 1:
                vdist.barrier()  # nobody runs ahead (or returns) before the file is complete

        bar = tqdm(total=(self.epochs - start_epoch) * steps, desc="finetune",
                   disable=not self.progress or rank != 0, leave=False)
        try:
            for epoch in range(start_epoch, self.epochs):
                if self.stop_after_epoch is not None and epoch >= self.stop_after_epoch:
                    assert ckpt is not None
                    raise FineTuneInterrupted(epoch, self.epochs, self.stop_after_epoch, ckpt)
                model.train()
                # Every stream is a function of (seed, epoch[, batch, rank]), never of what ran
                # before: a resumed run replays exactly what the uninterrupted one would have drawn.
                # Drop path draws from the global torch RNG, per process (decorrelated slices).
                torch.manual_seed(batch_seed(self.seed, epoch, rank, _DROP_PATH_STREAM))
                order = torch.Generator().manual_seed(batch_seed(self.seed, epoch, 0, _ORDER_STREAM))
                perm = torch.randperm(n, generator=order)
                loss_sum = torch.zeros((), device=device)
                for b in range(steps):
                    idx = perm[b * batch : (b + 1) * batch][lo : lo + per]
                    for g in optimizer.param_groups:
                        g["lr"] = self.lr_at(peak_lr, epoch + b / steps) * g["lr_scale"]
                    # One seeded generator per global batch (same scheme as the pretraining
                    # loader), its parameters drawn for the whole batch and cut to our rows: the
                    # global batch's crops depend neither on what ran before nor on the process count.
                    crop_gen = torch.Generator().manual_seed(batch_seed(self.seed, epoch, b, _CROP_STREAM))
                    images = _fetch(train_ds, idx).to(device, non_blocking=True)
                    x = augment(images, crop_gen, of_batch=batch, start=lo)[0]
                    y: Tensor = labels[idx].to(device)
                    if mixup_fn is not None:
                        # Same seed on every process: one lambda / box / mode per global batch.
                        with _numpy_seed(batch_seed(self.seed, epoch, b, _MIXUP_STREAM)):
                            x, y = mixup_fn(x, y)
                    with self._autocast(device):
                        logits = net(x)
                    loss = criterion(logits.float(), y)
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()  # DDP averages the gradients: the mean over the global batch
                    optimizer.step()
                    loss_sum += loss.detach()
                    bar.update(1)
                if world > 1:
                    loss_sum = vdist.all_reduce_mean(loss_sum)
                    # DDP syncs buffers at the start of a forward, so after the last step each
                    # process holds running statistics from its own slice: make them rank 0's
                    # before the model is evaluated, copied as the best weights and saved.
                    vdist.broadcast_buffers(model)
                train_loss = float(loss_sum) / steps
                if not math.isfinite(train_loss):
                    raise FloatingPointError(
                        f"finetune: training loss is {train_loss} at epoch {epoch + 1}; lower finetune.blr"
                    )
                if val_ds is not None:
                    val_top1, _ = self._evaluate(model, val_ds, splits, device, desc="finetune/val")
                    val_hist.append(val_top1)
                    bar.set_postfix(loss=f"{train_loss:.3f}", val_top1=f"{val_top1:.2f}")
                    # Strict ">" keeps the earliest of tied epochs: deterministic.
                    if self.select_on == "val" and val_top1 > best_top1:
                        best_top1, best_epoch = val_top1, epoch + 1
                        best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
                else:
                    bar.set_postfix(loss=f"{train_loss:.3f}")
                save(epoch + 1)
        finally:
            bar.close()

        if self.select_on == "last" or best_state is None:
            best_epoch = self.epochs
        else:
            model.load_state_dict(best_state)
        metrics: dict[str, float] = {"finetune/best_epoch": float(best_epoch), "finetune/train_loss": train_loss}
        if val_hist:
            metrics["finetune/val_top1"] = val_hist[best_epoch - 1]
        if splits.test is not None:
            top1, top5 = self._evaluate(model, splits.test, splits, device, desc="finetune/test")
            metrics["finetune/top1"] = top1
            if num_classes >= 5:
                metrics["finetune/top5"] = top5
        log.info(
            "finetune (%d epochs, train=%d, batch %d%s, lr %.3g, layer decay %g): best epoch %d, %s",
            self.epochs, n, batch, f" = {world} x {per}" if world > 1 else "", peak_lr, self.layer_decay, best_epoch,
            ", ".join(f"{k}={v:.2f}" for k, v in metrics.items() if k != "finetune/best_epoch"),
        )
        return metrics
