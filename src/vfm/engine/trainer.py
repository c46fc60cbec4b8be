"""The training loop, written once for pretraining and fine-tuning: named phases (set up the data,
set up the model, the train step, the end of an epoch, checkpoints) around one explicit loop. The
engine owns devices, precision, accumulation, clipping, schedules, the non-finite guard,
checkpoints, logging, progress bars and periodic evaluation; a strategy (`vfm.engine.strategy`:
one process, DDP, FSDP) owns what differs between process layouts, so the loop never asks which
one runs. Methods hold only the math (`vfm.methods.base.Method`).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from vfm.data.datasets import BadFileDataset
from vfm.data.loader import build_train_loader
from vfm.engine.checkpoint import load_model_state, resume_state, save_checkpoint
from vfm.engine.curves import add_point, trim_curve
from vfm.engine.device import (
    PRECISION_CHOICES,
    PRECISIONS,
    autocast,
    channels_last_batch,
    describe_precision,
    resolve_precision,
    select_device,
    to_device,
)
from vfm.engine.logging import NullLogger
from vfm.engine.optim import OptimSpec, clip_gradients, set_optimizer_values
from vfm.engine.preemption import DEFAULT_SIGNALS, Preempted, StopOnSignal
from vfm.engine.schedules import Schedule
from vfm.engine.state import EpochMeter, Evaluation, TrainData, TrainState
from vfm.engine.strategy import STRATEGIES, SingleProcess, build_strategy

__all__ = ["PRECISIONS", "NonFiniteLossError", "Trainer", "channels_last_batch", "select_device", "to_device"]

log = logging.getLogger(__name__)


class NonFiniteLossError(FloatingPointError):
    pass


class Trainer:
    """Configured under `trainer`.

    Args:
        max_epochs: training length (schedules span exactly this many epochs).
        batch_size: global batch per optimisation step (all processes x accumulation).
        accum_steps: gradient-accumulation micro-steps per optimisation step.
        precision: "auto" (bf16 where it is faster than fp32: a CUDA device with native bf16, a CPU
            where it measures >= 1.2x fp32; else fp32, see `vfm.engine.device.resolve_precision`), "fp32", "bf16"
            (autocast, also on CPU) or "fp16" (autocast + GradScaler). "auto" is decided once, when
            the run starts, by rank 0 for all processes, and kept in the checkpoints: a resumed run
            trains in the precision it started in.
        device: "auto", "cpu", "cuda" or "cuda:N".
        compile: wrap the method in `torch.compile`.
        num_workers: DataLoader worker processes per training process.
        seed: global seed (data order, augmentation, initialisation).
        log_every_n_steps: scalar logging period.
        ckpt_every_n_epochs: keep `epoch_XXXX.pt` every N epochs (0: only `last.pt`, which is
            rewritten every epoch).
        ckpt_every_n_steps: also rewrite `last.pt` every N steps (0: off), for long epochs.
        resume: "auto" (continue from the newest readable checkpoint in `<run>/checkpoints/`),
            "never", or a path. The process count may differ from the checkpoint's (same
            batch_size: the data order is global, see docs/reliability.md).
        max_steps: stop after this many optimisation steps (the schedules still span max_epochs).
        progress: tqdm progress bars on rank 0.
        dist_timeout_s: how long a collective (and the start-up rendezvous) waits for a missing
            process before the run fails; waits for rank 0's evaluations are not limited by it.
        data_timeout_s: how long to wait for one batch from a DataLoader worker before failing
            (0: forever); only with num_workers > 0.
        stop_signals: signals that stop training gracefully: checkpoint at the next step
            boundary, then exit (SLURM's time-limit warning, preemption, torchrun's shutdown).
        channels_last: NHWC memory format for the model and the image batches: true, false, or
            "auto" (for CNN encoders: ResNet-50 trains 1.14-1.17x faster on the CPU in `make bench`;
            ViTs convolve only in the patch embedding and are left as they are).
        strategy: with several processes, "ddp" (a full replica per process) or "fsdp" (FSDP2:
            parameters, gradients and optimizer state sharded over the processes; see
            `vfm.engine.fsdp`). Checkpoints have the same format under both. "single" trains in
            this process alone even when torch.distributed is initialised (rank 0 of a run
            fine-tuning while the others wait): no collectives, the whole batch here.
        augment_on_device: run the batch augmentation (crops, colour, blur, masks) on the training
            device after the transfer instead of in the DataLoader workers, which then only decode
            and stack uint8 images; same random parameters either way (the batch seed travels).
        persistent_workers: keep DataLoader workers alive across epochs (num_workers > 0).
        prefetch_factor: batches each DataLoader worker prepares ahead (num_workers > 0).
        pin_memory: page-locked host batches for asynchronous copies to the GPU: true, false or
            "auto" (on when training on CUDA).
    """

    def __init__(
        self,
        *,
        max_epochs: int = 100,
        batch_size: int = 256,
        accum_steps: int = 1,
        precision: str = "auto",
        device: str = "auto",
        compile: bool = False,
        num_workers: int = 0,
        seed: int = 0,
        log_every_n_steps: int = 10,
        ckpt_every_n_epochs: int = 0,
        ckpt_every_n_steps: int = 0,
        resume: str = "auto",
        max_steps: int | None = None,
        progress: bool = True,
        dist_timeout_s: float = 600.0,
        data_timeout_s: float = 600.0,
        stop_signals: tuple[str, ...] | list[str] = DEFAULT_SIGNALS,
        channels_last: bool | str = "auto",
        strategy: str = "ddp",
        augment_on_device: bool = False,
        persistent_workers: bool = True,
        prefetch_factor: int = 2,
        pin_memory: bool | str = "auto",
    ) -> None:
        if precision not in PRECISION_CHOICES:
            raise ValueError(f"trainer.precision must be one of {list(PRECISION_CHOICES)}, got {precision!r}")
        if strategy not in STRATEGIES:
            raise ValueError(f"trainer.strategy must be one of {list(STRATEGIES)}, got {strategy!r}")
        if prefetch_factor < 1:
            raise ValueError(f"trainer.prefetch_factor must be >= 1 (batches per worker), got {prefetch_factor}")
        if pin_memory not in (True, False, "auto"):
            raise ValueError(f"trainer.pin_memory must be true, false or auto, got {pin_memory!r}")
        self.max_epochs, self.batch_size, self.accum_steps = max_epochs, batch_size, accum_steps
        self.precision, self.device_name, self.compile = precision, device, compile
        self.run_precision = precision  # what `fit` trains in: "auto" resolved on its device
        self.num_workers, self.seed = num_workers, seed
        self.log_every_n_steps = log_every_n_steps
        self.ckpt_every_n_epochs, self.ckpt_every_n_steps = ckpt_every_n_epochs, ckpt_every_n_steps
        self.resume, self.max_steps, self.progress = resume, max_steps, progress
        self.dist_timeout_s, self.data_timeout_s, self.stop_signals = dist_timeout_s, data_timeout_s, tuple(stop_signals)
        self.channels_last = channels_last
        self.strategy, self.augment_on_device = strategy, augment_on_device
        self.persistent_workers, self.prefetch_factor, self.pin_memory = persistent_workers, prefetch_factor, pin_memory

    # ------------------------------------------------------------------ helpers
    def per_process_batch(self, world_size: int) -> int:
        return self.batch_size // (world_size * self.accum_steps)

    # ------------------------------------------------------------------ the loop
    def fit(
        self,
        method: nn.Module,
        train_dataset: torch.utils.data.Dataset,
        collate_fn: Callable,
        *,
        optim: OptimSpec,
        schedules: Mapping[str, Schedule],
        run_dir: str | Path,
        logger: NullLogger | None = None,
        evaluate_fn: Callable[[nn.Module, int], dict[str, float]] | None = None,
        eval_every_n_epochs: int = 0,
        extra_state: dict[str, Any] | None = None,
        eval_last_epoch: bool = False,
        eval_curves: str | Path | None = None,
    ) -> dict[str, Any]:
        """Train `method` and return {"step", "epoch", "history", "lr_rule", "finished",
        "steps_per_epoch"}.

        Afterwards `method` holds the trained weights, on the training device (under
        `strategy=fsdp`: on rank 0 only; the other ranks' copy is not updated).

        `evaluate_fn(encoder, epoch)` runs on rank 0 every `eval_every_n_epochs` epochs, except
        after the last one (the caller evaluates the final weights) unless `eval_last_epoch`;
        with `eval_curves`, each result is also recorded there with its epoch and step
        (`vfm.engine.curves`: the points after the step training resumes from are dropped).
        With `augment_on_device`, `collate_fn` is a `vfm.data.collate.Collate` that can defer.
        """
        strategy = build_strategy(self.strategy, select_device(self.device_name), self.accum_steps)
        logger = logger if (logger is not None and strategy.is_main) else NullLogger()
        data = self._setup_data(train_dataset, collate_fn, optim, schedules, strategy)
        run = self._setup_model(method, optim, data, strategy, Path(run_dir) / "checkpoints", logger)
        run.extra_state = extra_state or {}
        curves = Path(eval_curves) if eval_curves is not None else None
        run.evaluation = Evaluation(evaluate_fn, eval_every_n_epochs, eval_last_epoch, curves)
        if curves is not None and strategy.is_main:
            trim_curve(curves, run.step)
        run.net.train()
        with StopOnSignal(self.stop_signals) as stop:
            for epoch in range(run.step // data.steps_per_epoch, self.max_epochs):
                if run.step >= run.last_step:
                    break
                run.epoch = epoch
                meter = self._train_epoch(run, stop)
                self._end_epoch(run, meter, train_dataset)
        total_steps = data.steps_per_epoch * self.max_epochs
        result = {"step": run.step, "epoch": run.step / data.steps_per_epoch, "history": run.history,
                  "lr_rule": data.lr_rule, "finished": run.step >= total_steps, "steps_per_epoch": data.steps_per_epoch}
        del run  # the optimizer state (and under FSDP the shards): freed before the caller evaluates `method`
        strategy.finish(result["step"])
        return result

    # ------------------------------------------------------------------ set up the data
    def _setup_data(
        self, dataset: torch.utils.data.Dataset, collate_fn: Callable, optim: OptimSpec,
        schedules: Mapping[str, Schedule], strategy: SingleProcess,
    ) -> TrainData:
        """The loader of this process's share of every batch, and every schedule per step."""
        finish_batch = None
        if self.augment_on_device:
            collate_fn = collate_fn.deferred()  # a ValueError for a collate that cannot defer
            finish_batch = collate_fn.finish
        world, micro_bs = strategy.world, self.per_process_batch(strategy.world)
        pin = strategy.device.type == "cuda" if self.pin_memory == "auto" else bool(self.pin_memory)
        loader, sampler = build_train_loader(
            dataset, batch_size=micro_bs, collate_fn=collate_fn, seed=self.seed, rank=strategy.rank,
            world_size=world, num_workers=self.num_workers, pin_memory=pin, timeout=self.data_timeout_s,
            persistent_workers=self.persistent_workers, prefetch_factor=self.prefetch_factor,
        )
        micro_per_epoch = len(sampler) - len(sampler) % self.accum_steps
        steps_per_epoch = micro_per_epoch // self.accum_steps
        if steps_per_epoch == 0:
            raise ValueError(
                f"one epoch has no full optimisation step: {len(sampler)} micro-batches of {micro_bs} for "
                f"trainer.accum_steps={self.accum_steps}; lower trainer.batch_size or trainer.accum_steps"
            )
        global_batch = micro_bs * world * self.accum_steps
        lr_rule = optim.lr_rule(global_batch)
        log.info("%s (%d process(es) x %d images x %d accumulation)", lr_rule, world, micro_bs, self.accum_steps)
        arrays: dict[str, torch.Tensor] = {
            "lr": optim.lr_schedule(global_batch).build(steps_per_epoch, self.max_epochs),
            "wd": optim.wd_schedule().build(steps_per_epoch, self.max_epochs),
        }
        for name, spec in schedules.items():
            arrays[name] = spec.build(steps_per_epoch, self.max_epochs)
        values = {k: v.tolist() for k, v in arrays.items()}  # python floats: no tensor indexing per step
        return TrainData(loader, sampler, micro_bs, micro_per_epoch, steps_per_epoch, lr_rule, values, finish_batch)

    # ------------------------------------------------------------------ set up the model
    def _setup_model(
        self, method: nn.Module, optim: OptimSpec, data: TrainData, strategy: SingleProcess, ckpt_dir: Path,
        logger: NullLogger,
    ) -> TrainState:
        """Memory format, resumed weights, the strategy's wrapping, optimizer and loss scaler."""
        channels_last = self.channels_last
        if channels_last == "auto":
            channels_last = not getattr(method.encoder, "is_vit", True)
        if channels_last:
            method.to(memory_format=torch.channels_last)
        resumed = resume_state(self.resume, ckpt_dir, strategy.is_main)
        self.run_precision = self._resolve_precision(strategy, resumed)
        if resumed is not None:
            load_model_state(method, resumed[1]["model"], resumed[0])  # full weights, before any sharding
        net = strategy.wrap(method)
        optimizer = optim.build(net.param_groups(), strategy.device.type)
        total_steps = data.steps_per_epoch * self.max_epochs
        run = TrainState(
            strategy=strategy, data=data, optim=optim, optimizer=optimizer,
            scaler=torch.amp.GradScaler(strategy.device.type, enabled=self.run_precision == "fp16"),
            model=torch.compile(strategy.model) if self.compile else strategy.model,
            trainable=[p for g in optimizer.param_groups for p in g["params"]],
            channels_last=bool(channels_last), ckpt_dir=ckpt_dir, logger=logger, precision=self.run_precision,
            last_step=total_steps if self.max_steps is None else min(total_steps, self.max_steps),
        )
        if resumed is not None:
            run.restore(*resumed)
        strategy.start(run.step)
        # TensorBoard hides what an interrupted run logged after the checkpoint's step (whose own
        # values were flushed with it): one value per step
        logger.start(run.step + 1 if resumed is not None else 0)
        return run

    def _resolve_precision(self, strategy: SingleProcess, resumed: tuple[Path, dict[str, Any]] | None) -> str:
        """What this run trains in. "auto" resumed from a checkpoint that recorded its precision
        keeps it (the CPU timing, or another machine, could now choose differently); otherwise it
        is resolved here, by rank 0 for every process (each timing its own CPU could choose
        differently). An explicit precision is used as given."""
        stored = resumed[1].get("precision") if resumed is not None else None
        if self.precision == "auto" and stored is not None:
            chosen, reason = stored, f"chosen when the run started, kept from {resumed[0].name}"
        elif self.precision == "auto":
            mine = resolve_precision("auto", strategy.device) if strategy.is_main else None
            chosen, reason = strategy.broadcast_object(mine)
        else:
            chosen, reason = resolve_precision(self.precision, strategy.device)
        if strategy.is_main:
            log.info(describe_precision(self.precision, chosen, reason))
            if stored not in (None, chosen):
                log.warning("%s was trained in %s, this run continues in %s (trainer.precision=%s)",
                            resumed[0].name, stored, chosen, self.precision)
        return chosen

    # ------------------------------------------------------------------ the train step
    def _train_epoch(self, run: TrainState, stop: StopOnSignal) -> EpochMeter:
        """The optimisation steps of epoch `run.epoch` (the rest of it, when resumed mid-epoch)."""
        data, done = run.data, run.step - run.epoch * run.data.steps_per_epoch
        micro = done * self.accum_steps
        data.sampler.set_epoch(run.epoch, start_batch=micro)
        bar = tqdm(
            total=data.steps_per_epoch, initial=done, desc=f"epoch {run.epoch + 1}/{self.max_epochs}",
            disable=not (run.strategy.is_main and self.progress), dynamic_ncols=True, leave=False,
        )
        meter = EpochMeter()
        for batch in data.loader:
            if micro >= data.micro_per_epoch:
                break  # the ragged tail that does not fill an accumulation group
            sched = {k: v[run.step] for k, v in data.schedules.items()}
            # a method's `is_last_layer` groups (DINOv2) are frozen by a zero lr while `freeze_last_layer` is on
            set_optimizer_values(run.optimizer, sched["lr"], sched["wd"],
                                 last_layer_lr=0.0 if sched.get("freeze_last_layer", 0.0) > 0 else None)
            micro += 1
            out, loss_value = self._forward_backward(run, batch, sched, last_micro=micro % self.accum_steps == 0)
            meter.add(loss_value, data.micro_bs * run.strategy.world)
            if micro % self.accum_steps:
                continue
            grad_norm = self._optimizer_step(run, sched)
            bar.update(1)
            if run.step % self.log_every_n_steps == 0 or run.step == run.last_step:
                ips = meter.images_per_s_since_log()
                run.logger.log_scalars(run.step_scalars(out, sched, grad_norm, ips), run.step)
                bar.set_postfix(loss=f"{loss_value:.4f}", lr=f"{sched['lr']:.2e}", ips=f"{ips:.0f}")
            self._checkpoint_or_stop(run, stop)
            if run.step >= run.last_step:
                break
        bar.close()
        return meter

    def _forward_backward(self, run: TrainState, batch: Any, sched: dict[str, float], last_micro: bool) -> tuple[dict, float]:
        """One micro-step: the batch onto the device, forward, the non-finite guard, backward."""
        batch = to_device(batch, run.strategy.device)
        if run.data.finish_batch is not None:
            batch = run.data.finish_batch(batch)
        if run.channels_last:
            batch = channels_last_batch(batch)
        with run.strategy.accumulating(last_micro):
            with autocast(self.run_precision, run.strategy.device):
                out = run.model(batch, run.step, sched)
            loss = out["loss"]
            loss_value = float(loss.detach())  # one device sync per micro-step, reused by the caller
            if run.strategy.all_reduce_max_flag(not math.isfinite(loss_value)):
                raise NonFiniteLossError(
                    f"non-finite loss ({loss_value}) at step {run.step} (epoch {run.epoch + 1}) on at least "
                    f"one process; lower optim.blr, raise optim.warmup_epochs, or use trainer.precision=fp32/bf16"
                )
            run.scaler.scale(loss / self.accum_steps).backward()
        return out, loss_value

    def _optimizer_step(self, run: TrainState, sched: dict[str, float]) -> torch.Tensor | float:
        """Unscale, clip, step (fp16: skipped on overflow), the method's per-step hooks; returns
        the gradient norm before clipping."""
        scaler, optimizer = run.scaler, run.optimizer
        scaler.unscale_(optimizer)
        groups = run.net.gradient_clip_groups() if run.optim.clip_mode == "per_module" else None
        grad_norm = clip_gradients(run.trainable, run.optim.clip_grad, run.optim.clip_mode, groups=groups)
        run.net.before_optimizer_step(run.step, sched)
        scale = scaler.get_scale() if scaler.is_enabled() else 1.0
        scaler.step(optimizer)  # fp16: skipped when a gradient overflowed
        scaler.update()
        if scaler.is_enabled() and scaler.get_scale() < scale:
            run.n_overflow += 1
            log.debug("fp16: gradient overflow at step %d, update skipped, loss scale %g -> %g",
                      run.step, scale, scaler.get_scale())
        optimizer.zero_grad(set_to_none=True)
        run.net.on_step_end(run.step, sched)
        run.step += 1
        return grad_norm

    def _checkpoint_or_stop(self, run: TrainState, stop: StopOnSignal) -> None:
        """`last.pt` every `ckpt_every_n_steps`; on a stop signal, `last.pt` and `Preempted`."""
        if self.ckpt_every_n_steps and run.step % self.ckpt_every_n_steps == 0:
            self._checkpoint(run, "last.pt")
        # every process stops after the same step, whichever of them got the signal
        signum = run.strategy.all_reduce_max_int(stop.signum or 0)
        if signum:
            path = self._checkpoint(run, "last.pt")
            run.strategy.barrier()  # rank 0 has written it before any process exits
            raise Preempted(signum, run.step, str(path))

    # ------------------------------------------------------------------ the end of an epoch
    def _end_epoch(self, run: TrainState, meter: EpochMeter, train_dataset: torch.utils.data.Dataset) -> None:
        """The epoch's summary (evaluated when due), its log line, and its checkpoints."""
        epoch, steps_per_epoch = run.epoch, run.data.steps_per_epoch
        epoch_done = run.step == (epoch + 1) * steps_per_epoch
        dt = time.perf_counter() - meter.start
        summary = {
            "epoch": epoch + 1, "step": run.step, "loss": meter.loss_sum / max(meter.n_loss, 1),
            "images_per_s": meter.images / max(dt, 1e-9), "seconds": dt,
        }
        if epoch_done and run.evaluation.due(epoch + 1, self.max_epochs):
            summary.update(self._evaluate(run))
        if isinstance(train_dataset, BadFileDataset):  # corrupt inputs replaced (bad_files=skip)
            summary["skipped_files"] = int(train_dataset.num_skipped)
        run.history.append(summary)
        if run.strategy.is_main:
            run.log_epoch(summary, self.max_epochs)
        self._checkpoint(run, "last.pt")
        if epoch_done and self.ckpt_every_n_epochs and (epoch + 1) % self.ckpt_every_n_epochs == 0:
            self._checkpoint(run, f"epoch_{epoch + 1:04d}.pt")
        run.strategy.barrier()

    @staticmethod
    def _evaluate(run: TrainState) -> dict[str, float]:
        """`evaluate_fn` on rank 0 (the trained method, gathered under FSDP); the others wait."""
        metrics: dict[str, float] = {}
        with run.strategy.evaluation_method(run.step) as method:
            if method is not None:
                metrics = run.evaluation.fn(method.encoder, run.epoch + 1)
                run.logger.log_scalars({f"eval/{k}": v for k, v in metrics.items()}, run.step)
                if run.evaluation.curves is not None:
                    add_point(run.evaluation.curves, run.epoch + 1, run.step, metrics)
        run.strategy.wait_for_main()
        return metrics

    # ------------------------------------------------------------------ checkpoints
    def _checkpoint(self, run: TrainState, name: str) -> Path:
        """Write `run.ckpt_dir / name` on rank 0; every process calls it (FSDP gathers)."""
        path = run.ckpt_dir / name
        model_state, optim_state = run.strategy.full_state(run.optimizer, run.step)
        if not run.strategy.is_main:
            return path
        save_checkpoint(run.checkpoint(model_state, optim_state), path)
        run.logger.flush()  # what was logged up to this step survives a kill, and is not logged again
        return path
