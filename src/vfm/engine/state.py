"""What one `Trainer.fit` carries from phase to phase: the data plan, the training state (which is
also what a checkpoint holds, and what is logged), and an epoch's meters."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from vfm.engine.checkpoint import rng_state, set_rng_state
from vfm.engine.logging import NullLogger
from vfm.engine.optim import OptimSpec
from vfm.engine.strategy import SingleProcess

log = logging.getLogger("vfm.engine.trainer")  # the trainer's log: one place to read a run's progress


@dataclass
class TrainData:
    """What `Trainer._setup_data` prepares: the loader and the per-step schedules."""

    loader: torch.utils.data.DataLoader
    sampler: Any  # vfm.data.sampler's seeded, resumable sampler
    micro_bs: int  # images per process and micro-step
    micro_per_epoch: int  # micro-steps per epoch, a whole number of accumulation groups
    steps_per_epoch: int
    lr_rule: str
    schedules: dict[str, list[float]]  # name -> value at every step (lr, wd, the method's own)
    finish_batch: Callable[[Any], Any] | None  # the deferred augmentation, on the device


@dataclass
class Evaluation:
    """`fit`'s periodic evaluation: `fn(encoder, epoch)` after every `every_n_epochs`-th epoch, the
    last one only if `last_epoch` (pretraining evaluates the final weights itself); each result
    is also a point of the learning curve in `curves` (`vfm.engine.curves`) when given."""

    fn: Callable[[nn.Module, int], dict[str, float]] | None = None
    every_n_epochs: int = 0
    last_epoch: bool = False
    curves: Path | None = None

    def due(self, epoch: int, max_epochs: int) -> bool:
        """Whether it runs after `epoch` (counted from 1)."""
        return (
            self.fn is not None and bool(self.every_n_epochs) and epoch % self.every_n_epochs == 0
            and (self.last_epoch or epoch < max_epochs)
        )


@dataclass
class TrainState:
    """The state one `fit` carries from phase to phase."""

    strategy: SingleProcess
    data: TrainData
    optim: OptimSpec
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    model: nn.Module  # what runs the forward: the strategy's wrapper, compiled or not
    trainable: list[nn.Parameter]  # the optimizer's parameters, clipped before each step
    channels_last: bool
    ckpt_dir: Path
    logger: NullLogger
    last_step: int  # max_steps, or the end of the schedules
    precision: str  # trainer.precision with "auto" resolved: a resumed run keeps it
    extra_state: dict[str, Any] = field(default_factory=dict)  # the caller's, saved in every checkpoint
    evaluation: Evaluation = field(default_factory=Evaluation)
    step: int = 0
    epoch: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)
    n_overflow: int = 0  # fp16: steps the scaler skipped

    @property
    def net(self) -> nn.Module:
        """The module that trains (its parameters are the optimizer's)."""
        return self.strategy.net

    @property
    def global_batch(self) -> int:
        """Images per optimisation step, over all processes and accumulation micro-steps."""
        accum_steps = self.data.micro_per_epoch // self.data.steps_per_epoch
        return self.data.micro_bs * self.strategy.world * accum_steps

    def checkpoint(self, model_state: dict[str, Any], optim_state: dict[str, Any]) -> dict[str, Any]:
        """The checkpoint of this step, given the full model and optimizer states."""
        steps_per_epoch = self.data.steps_per_epoch
        return {
            "model": model_state, "optimizer": optim_state, "scaler": self.scaler.state_dict(),
            "step": self.step, "epoch": self.step // steps_per_epoch, "steps_per_epoch": steps_per_epoch,
            "rng": rng_state(), "history": self.history, "lr_rule": self.data.lr_rule, "precision": self.precision,
            # what elastic resume checks (another process count is fine, another global batch is not)
            "global_batch": self.global_batch, "train_samples": self.data.sampler.dataset_len,
            "world_size": self.strategy.world, "micro_batch": self.data.micro_bs, **self.extra_state,
        }

    def restore(self, path: Path, state: dict[str, Any]) -> None:
        """Optimizer, loss scale, RNG, step and history from the checkpoint `state` read from `path`."""
        self._check_resumable(path, state)
        self.strategy.load_optimizer_state(self.optimizer, state["optimizer"])
        self.scaler.load_state_dict(state["scaler"])
        steps_per_epoch = self.data.steps_per_epoch
        set_rng_state(state["rng"])
        self.step, self.history = int(state["step"]), list(state.get("history", []))
        log.info("resumed from %s at step %d (epoch %d)", path, self.step, self.step // steps_per_epoch)

    def _check_resumable(self, path: Path, state: dict[str, Any]) -> None:
        """Refuse a checkpoint whose optimisation steps are not this run's: another global batch or
        dataset. Another process count is fine (the data order is global, `vfm.data.sampler`);
        checkpoints from before `global_batch` was recorded are checked on steps per epoch alone."""
        keep = "keep trainer.batch_size (the global batch) and the dataset unchanged; the process count may change"
        if state.get("global_batch") not in (None, self.global_batch):
            raise ValueError(
                f"cannot resume {path}: it was trained with a global batch of {state['global_batch']} images, this run "
                f"has {self.global_batch}; {keep}"
            )
        if state.get("train_samples") not in (None, self.data.sampler.dataset_len):
            raise ValueError(
                f"cannot resume {path}: it was trained on {state['train_samples']} images, this run's training set "
                f"has {self.data.sampler.dataset_len}; {keep}"
            )
        if state.get("steps_per_epoch") not in (None, self.data.steps_per_epoch):
            raise ValueError(
                f"cannot resume {path}: it had {state['steps_per_epoch']} steps per epoch, this run has "
                f"{self.data.steps_per_epoch}; {keep}"
            )
        world = state.get("world_size")
        if world is not None and world != self.strategy.world:
            log.info("resuming a run of %d process(es) on %d: the same samples in the same order", world, self.strategy.world)
            if state.get("micro_batch") not in (None, self.data.micro_bs):
                # a sample's crops are drawn with its chunk of `micro_batch` images (vfm.data.sampler)
                log.warning(
                    "%s used %d images per process and micro-step, this run %d: the augmentation draws differ from "
                    "here on; set trainer.accum_steps so that processes x accum_steps = %d to keep them",
                    path.name, state["micro_batch"], self.data.micro_bs, self.global_batch // state["micro_batch"],
                )

    def step_scalars(self, out: dict[str, torch.Tensor], sched: dict[str, float], grad_norm: torch.Tensor | float,
                     images_per_s: float) -> dict[str, float]:
        """What is logged every `log_every_n_steps`: the method's outputs, schedules, throughput."""
        values = {f"train/{k}": float(v.detach()) for k, v in out.items()}
        values.update({f"sched/{k}": v for k, v in sched.items()})
        values.update({"train/grad_norm": float(grad_norm), "perf/images_per_s": images_per_s})
        if self.scaler.is_enabled():
            values.update({"train/loss_scale": self.scaler.get_scale(), "train/overflow_steps": self.n_overflow})
        return values

    def log_epoch(self, summary: dict[str, Any], max_epochs: int) -> None:
        """The epoch's log line and scalars (rank 0)."""
        extra = " | ".join(f"{k} {v:.2f}" for k, v in summary.items() if "/" in k)
        log.info(
            "epoch %d/%d | step %d | loss %.4f | %.0f img/s | %.1f s%s", summary["epoch"], max_epochs, self.step,
            summary["loss"], summary["images_per_s"], summary["seconds"], (" | " + extra) if extra else "",
        )
        self.logger.log_scalars({"epoch/loss": summary["loss"], "epoch/images_per_s": summary["images_per_s"]}, self.step)
        if summary.get("skipped_files"):
            log.warning("%d corrupt training file(s) skipped so far (dataset.bad_files=skip)", summary["skipped_files"])
            self.logger.log_scalars({"data/skipped_files": summary["skipped_files"]}, self.step)


@dataclass
class EpochMeter:
    """Mean loss and throughput of one epoch; images since the last logged step."""

    start: float = field(default_factory=time.perf_counter)
    images: int = 0
    loss_sum: float = 0.0
    n_loss: int = 0
    t_log: float = field(default_factory=time.perf_counter)
    images_since_log: int = 0

    def add(self, loss: float, images: int) -> None:
        self.loss_sum, self.n_loss = self.loss_sum + loss, self.n_loss + 1
        self.images, self.images_since_log = self.images + images, self.images_since_log + images

    def images_per_s_since_log(self) -> float:
        now = time.perf_counter()
        ips = self.images_since_log / max(now - self.t_log, 1e-9)
        self.t_log, self.images_since_log = now, 0
        return ips
