"""End-to-end (full) fine-tuning of a pretrained encoder with a new linear classifier.

The protocol is MAE's fine-tuning recipe (He et al., CVPR 2022, Appendix A.1; facebookresearch/mae
`main_finetune.py`, `util/lr_sched.py`): BEiT's layer-wise lr decay, DeiT's mixup + cutmix, label
smoothing and stochastic depth, AdamW (betas 0.9, 0.999) at `lr = blr * batch / 256` with a linear
warmup then a half-cosine to `min_lr`, per iteration, and a constant weight decay. The network is
`vfm.methods.classifier.Classifier` (a copy of the encoder + a linear head); it trains on the one
training loop, `vfm.engine.trainer.Trainer.fit`, which owns the process layout (one process, DDP
or FSDP), precision, the schedules, checkpoints and resume. Training images get a random resized
crop (`crop_scale`) to `img_size` + a horizontal flip (MAE also uses RandAugment and random
erasing; left out to stay cheap on CPU), then mixup / cutmix (`SupervisedCollate`).

**Model selection on validation, never on test.** Top-1 on `splits.val` (a seeded 10% of train
when there is none) after every epoch; a strict improvement writes the weights to
`<checkpoint_dir>/best.pt` (atomically). MAE reports the best accuracy on ImageNet-val, which is
its test set; here `splits.test` is evaluated exactly once, with the selected weights.

**Resume.** The engine's checkpoint `<checkpoint_dir>/checkpoints/last.pt` (weights, optimizer,
RNG, per-epoch history) is written after every epoch and carries a fingerprint of the settings and
of the encoder's weights; a later call with the same directory resumes from it (or only tests the
selected weights when every epoch is done) and refuses a checkpoint written with other settings.
Every random stream is either seeded per batch (order, crops, mixup) or in the checkpoint (drop
path), so an interrupted and resumed run is bitwise the uninterrupted one in fp32.
`stop_after_epoch` stops early (`FineTuneInterrupted`), for tests and time-boxed jobs.

**Processes.** Under torchrun every process makes the call and they train together (DDP, or FSDP
with `strategy="fsdp"`); `batch_size` is the global batch. Rank 0 alone evaluates (val after each
epoch, then test) and every process returns its metrics. `distributed=False` trains in this
process alone (pretraining's rank-0 evaluation).
"""

from __future__ import annotations

import contextlib
import logging
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import Dataset, Subset
from tqdm.auto import tqdm

from vfm import distributed as vdist
from vfm.data.datasets import DataSplits, TensorImageDataset
from vfm.data.loader import build_eval_loader
from vfm.data.transforms import MultiCropAugmentation, normalize
from vfm.engine.checkpoint import find_resume_checkpoint
from vfm.engine.device import PRECISION_CHOICES, autocast, resolve_precision
from vfm.engine.optim import OptimSpec
from vfm.engine.trainer import Trainer
from vfm.evaluators.finetune_state import FORMAT, ValSelection, check_fingerprint, weights_digest
from vfm.evaluators.metrics import topk_correct
from vfm.evaluators.protocols import TrainsEncoderEvaluator
from vfm.methods.classifier import Classifier
from vfm.rng import global_rng

__all__ = ["BEST_NAME", "CHECKPOINT_NAME", "FineTune", "FineTuneInterrupted"]

log = logging.getLogger(__name__)

# Under checkpoint_dir: the engine's checkpoint (the trainer's run_dir is checkpoint_dir), and
# the weights selected on val so far.
CHECKPOINT_NAME = "checkpoints/last.pt"
BEST_NAME = "best.pt"
_STRATEGIES = ("ddp", "fsdp")


class FineTuneInterrupted(RuntimeError):
    """Raised when a run stops at `stop_after_epoch` before its last epoch; the state of that
    epoch is in `path`, and a call with the same `checkpoint_dir` resumes from it."""

    def __init__(self, epoch: int, epochs: int, stop_after_epoch: int, path: Path) -> None:
        super().__init__(
            f"finetune stopped after epoch {epoch}/{epochs} (stop_after_epoch={stop_after_epoch}); its state is "
            f"in {path}: call again with the same checkpoint_dir and a later (or no) stop_after_epoch to resume"
        )
        self.epoch, self.epochs, self.path = epoch, epochs, path


def _labels_of(dataset: Dataset) -> Tensor:
    labels = getattr(dataset, "labels", None)
    if isinstance(labels, Tensor) and len(labels) == len(dataset):  # type: ignore[arg-type]
        return labels.to(torch.int64)
    # Generic datasets: read every label once (decodes the images; fine for small sets).
    return torch.tensor([int(dataset[i][1]) for i in range(len(dataset))], dtype=torch.int64)  # type: ignore[arg-type]


def _subset(dataset: Dataset, idx: Tensor) -> Dataset:
    if isinstance(dataset, TensorImageDataset):
        return TensorImageDataset(dataset.images[idx], dataset.labels[idx])
    return Subset(dataset, idx.tolist())


def _train_and_val(splits: DataSplits, seed: int, hold_out: bool) -> tuple[Dataset, int, Dataset | None]:
    """The labelled training samples (e.g. STL-10's train split mixes in unlabelled ones), their
    count, and the val split: with `hold_out` and no val split, a seeded 10% of train (as the
    linear probe), so the epoch is never chosen on test."""
    train, labels, val = splits.train, _labels_of(splits.train), splits.val
    labelled = (labels >= 0).nonzero().squeeze(1)
    if len(labelled) < len(labels):
        log.info("finetune: dropping %d unlabelled training samples", len(labels) - len(labelled))
        train, labels = _subset(train, labelled), labels[labelled]
    if bool((labels >= splits.num_classes).any()):
        raise ValueError(f"finetune: train labels reach {int(labels.max())} but num_classes={splits.num_classes}")
    if val is None and hold_out:
        perm = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))
        n_val = max(1, len(labels) // 10)
        if n_val >= len(labels):
            raise ValueError("finetune needs a val split or at least 2 labelled training samples")
        val, train = _subset(train, perm[:n_val].sort().values), _subset(train, perm[n_val:].sort().values)
        log.info("finetune: no val split, holding out %d training samples (seed %d) for model selection", n_val, seed)
        return train, len(labels) - n_val, val
    return train, len(labels), val


def _check_args(ft: FineTune) -> None:
    checks = [
        (ft.epochs >= 1, f"epochs must be >= 1, got {ft.epochs}"),
        (ft.batch_size >= 2, f"batch_size must be >= 2, got {ft.batch_size}"),
        (ft.blr > 0 and ft.min_lr >= 0, f"blr must be > 0 and min_lr >= 0, got {ft.blr}, {ft.min_lr}"),
        (ft.warmup_epochs >= 0, f"warmup_epochs must be >= 0, got {ft.warmup_epochs}"),
        (0 < ft.layer_decay <= 1, f"layer_decay must be in (0, 1], got {ft.layer_decay}"),
        (0 <= ft.drop_path < 1, f"drop_path must be in [0, 1), got {ft.drop_path}"),
        (0 <= ft.label_smoothing < 1, f"label_smoothing must be in [0, 1), got {ft.label_smoothing}"),
        (ft.mixup >= 0 and ft.cutmix >= 0, f"mixup / cutmix must be >= 0, got {ft.mixup}, {ft.cutmix}"),
        (ft.precision in PRECISION_CHOICES, f"precision must be one of {list(PRECISION_CHOICES)}, got {ft.precision!r}"),
        (ft.select_on in ("val", "last"), f"select_on must be 'val' or 'last', got {ft.select_on!r}"),
        (ft.stop_after_epoch is None or ft.stop_after_epoch >= 1, f"stop_after_epoch must be >= 1 or None, got {ft.stop_after_epoch}"),
        (ft.strategy in _STRATEGIES, f"strategy must be one of {list(_STRATEGIES)}, got {ft.strategy!r}"),
    ]
    for ok, message in checks:
        if not ok:
            raise ValueError(f"finetune.{message}")


class FineTune(TrainsEncoderEvaluator):
    """Full fine-tuning evaluator (MAE recipe, see the module docstring); best epoch chosen on val.

    Args:
        epochs: training epochs (MAE ViT-B: 100).
        batch_size: global batch per step (MAE: 1024 = 32 x 32 GPUs).
        blr: base lr; the lr is `blr * batch / 256` (MAE ViT-B: 5e-4).
        min_lr: floor of the cosine schedule (MAE: 1e-6).
        warmup_epochs: linear warmup, in epochs, may be fractional (MAE: 5).
        weight_decay: AdamW weight decay, constant (MAE: 0.05).
        layer_decay: layer-wise lr decay (MAE: 0.65 for ViT-B, 0.75 for ViT-L/H).
        drop_path: stochastic depth rate of the last block (MAE ViT-B: 0.1).
        label_smoothing: (MAE: 0.1).
        mixup, cutmix: Beta-distribution alphas; both 0 disables mixing (MAE: 0.8, 1.0).
        mixup_prob: probability of mixing a batch (MAE: 1.0).
        mixup_switch_prob: probability of cutmix instead of mixup when both are on (MAE: 0.5).
        crop_scale: area range of the random resized crop (MAE: (0.08, 1.0)).
        flip_p: horizontal flip probability (MAE: 0.5).
        seed: seeds shuffling, augmentation, mixup, head init and drop path.
        precision: "bf16" (autocast, also on CPU), "auto" (bf16 where faster), "fp32" or "fp16" (+ loss scaling).
        device: where to train; overridden by `__call__(device=...)`.
        progress: show progress bars.
        select_on: "val" keeps the epoch with the best validation top-1; "last" the final weights.
        stop_after_epoch: stop (raise `FineTuneInterrupted`) once this many epochs are done and
            saved, before the last one; a later call with the same `checkpoint_dir` resumes.
            Needs `checkpoint_dir`. None: run to the end.
        strategy: under torchrun, "ddp" (a replica per process) or "fsdp" (sharded).
    """

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
        precision: str = "auto",
        device: str = "cpu",
        progress: bool = True,
        select_on: str = "val",
        stop_after_epoch: int | None = None,
        strategy: str = "ddp",
    ) -> None:
        self.epochs, self.batch_size = int(epochs), int(batch_size)
        self.blr, self.min_lr, self.warmup_epochs = float(blr), float(min_lr), float(warmup_epochs)
        self.weight_decay, self.layer_decay, self.drop_path = float(weight_decay), float(layer_decay), float(drop_path)
        self.label_smoothing, self.mixup, self.cutmix = float(label_smoothing), float(mixup), float(cutmix)
        self.mixup_prob, self.mixup_switch_prob = float(mixup_prob), float(mixup_switch_prob)
        self.crop_scale = (float(crop_scale[0]), float(crop_scale[1]))  # Hydra passes a ListConfig
        self.flip_p, self.seed, self.precision = float(flip_p), int(seed), precision
        self.device, self.progress, self.select_on, self.strategy = device, progress, select_on, strategy
        self.stop_after_epoch = None if stop_after_epoch is None else int(stop_after_epoch)
        _check_args(self)

    # ------------------------------------------------------------------ what trains, and how
    def build_model(self, encoder: nn.Module, num_classes: int) -> Classifier:
        """A copy of `encoder` (drop path set) + a fresh linear head. The head init draws from the
        global torch RNG: seed it first (`__call__` does)."""
        if num_classes < 1:
            raise ValueError(f"fine-tuning needs a labelled dataset, got num_classes={num_classes}")
        return Classifier(
            encoder, num_classes=num_classes, drop_path=self.drop_path, layer_decay=self.layer_decay,
            label_smoothing=self.label_smoothing, mixup=self.mixup, cutmix=self.cutmix, mixup_prob=self.mixup_prob,
            mixup_switch_prob=self.mixup_switch_prob,
        )

    def optim_spec(self) -> OptimSpec:
        """MAE's optimizer: AdamW (0.9, 0.999), no clipping, `blr * batch / 256`, warmup then
        half-cosine to `min_lr` per iteration, constant weight decay (each group scaled by its
        `lr_mult` / `wd_mult`)."""
        return OptimSpec(
            name="adamw", blr=self.blr, min_lr=self.min_lr, warmup_epochs=self.warmup_epochs,
            weight_decay=self.weight_decay, weight_decay_end=self.weight_decay, betas=(0.9, 0.999), clip_grad=None,
        )

    def augmentation(self, splits: DataSplits) -> MultiCropAugmentation:
        """Random resized crop to `img_size` + horizontal flip, normalised; nothing else."""
        return MultiCropAugmentation(
            n_global=1, n_local=0, global_crop_size=splits.img_size, local_crop_size=splits.img_size,
            global_scale=self.crop_scale, flip_p=self.flip_p, color_jitter_p=0.0, grayscale_p=0.0,
            blur_p=(0.0, 0.0, 0.0), solarize_p=(0.0, 0.0, 0.0), mean=splits.mean, std=splits.std,
        )

    def _fingerprint(self, encoder: nn.Module, **extra: Any) -> dict[str, Any]:
        """Everything that shapes the training trajectory: a checkpoint is resumed only when this
        is equal (the process count and strategy are not in it: the engine resumes across them)."""
        return {
            "epochs": self.epochs, "blr": self.blr, "min_lr": self.min_lr, "warmup_epochs": self.warmup_epochs,
            "weight_decay": self.weight_decay, "layer_decay": self.layer_decay, "drop_path": self.drop_path,
            "label_smoothing": self.label_smoothing, "mixup": self.mixup, "cutmix": self.cutmix,
            "mixup_prob": self.mixup_prob, "mixup_switch_prob": self.mixup_switch_prob,
            "crop_scale": list(self.crop_scale), "flip_p": self.flip_p, "seed": self.seed,
            "precision": self.precision, "select_on": self.select_on,
            "encoder_params": sum(p.numel() for p in encoder.parameters()),
            "encoder_digest": weights_digest(encoder), **extra,
        }

    def _global_batch(self, n: int, world: int) -> int:
        """The global batch: `batch_size`, at most the training set, in whole (even, when mixing:
        timm's Mixup pairs images within a process's batch) slices per process."""
        mixing = self.mixup > 0 or self.cutmix > 0
        unit = world * (2 if mixing else 1)
        if world > 1 and self.batch_size % unit:
            even = " into an even number of images per process (mixup pairs images within a process)" if mixing else ""
            raise ValueError(
                f"finetune.batch_size={self.batch_size} (the global batch) does not split over {world} processes"
                f"{even}; use a multiple of {unit}, e.g. finetune.batch_size={unit * max(1, self.batch_size // unit)}"
            )
        batch = min(self.batch_size, n)
        batch -= batch % unit
        if batch == 0:
            raise ValueError(f"finetune: {n} labelled training samples are too few for a batch"
                             + (f" of {unit} over {world} processes" if world > 1 else ""))
        return batch

    @torch.no_grad()
    def _evaluate(
        self, model: Classifier, dataset: Dataset, splits: DataSplits, device: torch.device, *, desc: str
    ) -> tuple[float, float]:
        """Top-1 and top-5 accuracy (percent) on the labelled samples of `dataset`: the full image
        (centre-cropped to `img_size` when stored larger), normalised, no augmentation."""
        was_training = model.training
        model.eval()
        correct1 = correct5 = total = 0
        for images, labels in tqdm(build_eval_loader(dataset, batch_size=self.batch_size), desc=desc,
                                   disable=not self.progress, leave=False):
            keep = labels >= 0  # unlabelled samples (-1) cannot be scored
            if not bool(keep.any()):
                continue
            x = normalize(images[keep].to(device), splits.mean, splits.std, crop_size=splits.img_size)
            y = labels[keep].to(device)
            with autocast(resolve_precision(self.precision, device)[0], device):
                logits = model.logits(x).float()
            correct1 += int(topk_correct(logits, y, 1).sum())
            correct5 += int(topk_correct(logits, y, 5).sum())
            total += len(y)
        model.train(was_training)
        if total == 0:
            return float("nan"), float("nan")
        return 100.0 * correct1 / total, 100.0 * correct5 / total

    # ------------------------------------------------------------------ the run
    def __call__(
        self,
        encoder: nn.Module,
        splits: DataSplits,
        *,
        device: str | None = None,
        checkpoint_dir: str | Path | None = None,
        distributed: bool = True,
    ) -> dict[str, float]:
        """Fine-tune a copy of `encoder` on `splits.train` and return, in percent,
        `finetune/val_top1` (selected epoch), `finetune/best_epoch` (1-based), `finetune/train_loss`
        (mean over the last epoch) and, with a test split, `finetune/top1` (+ `finetune/top5` when
        `num_classes >= 5`, as the linear probe) of the selected weights.

        `checkpoint_dir`: the run directory (`checkpoints/last.pt`, `best.pt`), resumed when it
        holds a checkpoint; a temporary one without it. Under DDP, on a file system all processes see.
        `distributed`: under torchrun every process makes the call and they train together;
        `False` trains in this process alone (pretraining's rank-0 evaluation)."""
        dev = torch.device(device if device is not None else self.device)
        if dev.type == "cuda" and dev.index is None:
            dev = torch.device("cuda", torch.cuda.current_device())
        if self.stop_after_epoch is not None and checkpoint_dir is None:
            raise ValueError("finetune.stop_after_epoch needs a checkpoint_dir: stopping early without saving "
                             "would throw the training away")
        # The head init draws from the global RNGs, seeded here and restored afterwards (the
        # engine also restores them from a checkpoint), so a pretraining run calling us is unaffected.
        with contextlib.ExitStack() as stack:
            stack.enter_context(torch.random.fork_rng(devices=[dev.index] if dev.type == "cuda" else []))
            stack.enter_context(global_rng(seed=self.seed))
            torch.manual_seed(self.seed)
            if checkpoint_dir is None:
                checkpoint_dir = stack.enter_context(tempfile.TemporaryDirectory(prefix="vfm-finetune-"))
            return self._run(encoder, splits, dev, Path(checkpoint_dir), distributed)

    def _run(self, encoder: nn.Module, splits: DataSplits, dev: torch.device, run_dir: Path,
             distributed: bool) -> dict[str, float]:
        world = vdist.get_world_size() if distributed else 1
        is_main = not distributed or vdist.get_rank() == 0
        train_ds, n, val_ds = _train_and_val(splits, self.seed, hold_out=self.select_on == "val")
        batch = self._global_batch(n, world)
        steps_per_epoch = n // batch  # the engine's sampler: whole global batches (batch splits over world)
        fingerprint = self._fingerprint(encoder, batch=batch, num_classes=int(splits.num_classes), train_samples=n,
                                        val_samples=0 if val_ds is None else len(val_ds))  # type: ignore[arg-type]
        resumed = self._resumable(run_dir, fingerprint)
        model = self.build_model(encoder, int(splits.num_classes))
        selection = ValSelection(lambda: self._evaluate(model, val_ds, splits, dev, desc="finetune/val")[0],
                                  model, run_dir / BEST_NAME, fingerprint, select=self.select_on == "val")
        if is_main:
            selection.restore(resumed)
        trainer = Trainer(
            max_epochs=self.epochs, batch_size=batch, precision=self.precision, device=str(dev), seed=self.seed,
            resume="auto", progress=self.progress, strategy=self.strategy if distributed else "single",
            max_steps=None if self.stop_after_epoch is None else self.stop_after_epoch * steps_per_epoch,
        )
        result = trainer.fit(
            model, train_ds, model.build_collate(self.augmentation(splits)), optim=self.optim_spec(), schedules={},
            run_dir=run_dir, evaluate_fn=selection if val_ds is not None else None, eval_every_n_epochs=1,
            eval_last_epoch=True, extra_state={"format": FORMAT, "fingerprint": fingerprint, "world_size": world},
        )
        assert result["steps_per_epoch"] == steps_per_epoch, (result["steps_per_epoch"], steps_per_epoch)
        if not result["finished"]:
            assert self.stop_after_epoch is not None
            raise FineTuneInterrupted(result["step"] // steps_per_epoch, self.epochs, self.stop_after_epoch,
                                      run_dir / CHECKPOINT_NAME)
        # the engine's epoch loss is this process's mean: averaged over the processes' equal shares
        # (a run found finished reads rank 0's share from the checkpoint's history)
        train_loss = torch.tensor(result["history"][-1]["loss"], device=dev)
        train_loss = float(vdist.all_reduce_mean(train_loss) if world > 1 else train_loss)
        metrics = self._test(model, selection, result["history"], splits, dev) if is_main else {}
        if world > 1:
            vdist.wait_for_main()  # rank 0 tested alone, however long it took
            box = [metrics]
            torch.distributed.broadcast_object_list(box, src=0, device=dev if dev.type == "cuda" else None)
            metrics = box[0]
        metrics["finetune/train_loss"] = train_loss
        if is_main:
            per = f" = {world} x {batch // world}" if world > 1 else ""
            log.info("finetune (%d epochs, train=%d, batch %d%s, lr %.3g, layer decay %g): %s", self.epochs, n, batch,
                     per, self.optim_spec().peak_lr(batch), self.layer_decay,
                     ", ".join(f"{k}={v:.2f}" for k, v in sorted(metrics.items())))
        return metrics

    def _resumable(self, run_dir: Path, fingerprint: dict[str, Any]) -> bool:
        """Whether the engine will resume from a checkpoint in `run_dir`, once it is known to
        have been written with these settings and this encoder."""
        found = find_resume_checkpoint(run_dir / Path(CHECKPOINT_NAME).parent)
        if found is None:
            return False
        path, state = found
        check_fingerprint(state, fingerprint, path)
        world = f" (written by {state['world_size']} process(es))" if state.get("world_size", 1) > 1 else ""
        log.info("finetune: resuming from %s after epoch %d/%d%s", path, state["epoch"], self.epochs, world)
        return True

    def _test(self, model: Classifier, selection: ValSelection, history: list[dict[str, Any]], splits: DataSplits,
              dev: torch.device) -> dict[str, float]:
        """The selected weights (or the last), their val top-1 and, once, their test accuracy."""
        best_epoch = selection.load_best() or self.epochs
        metrics = {"finetune/best_epoch": float(best_epoch)}
        val = {int(h["epoch"]): h["finetune/val_top1"] for h in history if "finetune/val_top1" in h}
        if best_epoch in val:
            metrics["finetune/val_top1"] = float(val[best_epoch])
        if splits.test is not None:
            top1, top5 = self._evaluate(model, splits.test, splits, dev, desc="finetune/test")
            metrics["finetune/top1"] = top1
            if splits.num_classes >= 5:
                metrics["finetune/top5"] = top5
        return metrics
