"""The training loop: one explicit loop that owns devices, precision, accumulation, clipping, DDP,
schedules, the non-finite guard, checkpoints, logging, progress bars and periodic evaluation.
Methods hold only the math (`vfm.methods.base.Method`).
"""

from __future__ import annotations

import copy
import logging
import math
import time
from collections.abc import Callable, Mapping
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from vfm import distributed as vdist
from vfm.data.loader import build_train_loader
from vfm.engine import fsdp
from vfm.engine.checkpoint import (
    check_keys,
    find_resume_checkpoint,
    load_checkpoint,
    load_model_state,
    remove_stale_temporaries,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from vfm.engine.logging import NullLogger
from vfm.engine.optim import OptimSpec, clip_gradients, set_optimizer_values
from vfm.engine.preemption import DEFAULT_SIGNALS, Preempted, StopOnSignal
from vfm.engine.schedules import Schedule

log = logging.getLogger(__name__)

PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


class NonFiniteLossError(FloatingPointError):
    pass


def select_device(device: str) -> torch.device:
    """"auto" picks cuda (this process's local GPU under torchrun) when present, else cpu."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError("trainer.device=cuda but no CUDA device is visible; use trainer.device=auto or cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and dev.index is None and vdist.is_dist():
        dev = torch.device("cuda", torch.cuda.current_device())
    return dev


def to_device(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, dict):
        return {k: to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(to_device(v, device) for v in batch)
    return batch


def channels_last_batch(batch: Any) -> Any:
    """4-D float tensors of a batch (images, crops) in NHWC memory format."""
    if isinstance(batch, torch.Tensor):
        return batch.contiguous(memory_format=torch.channels_last) if batch.ndim == 4 and batch.is_floating_point() else batch
    if isinstance(batch, dict):
        return {k: channels_last_batch(v) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(channels_last_batch(v) for v in batch)
    return batch


class Trainer:
    """Configured under `trainer`.

    Args:
        max_epochs: training length (schedules span exactly this many epochs).
        batch_size: global batch per optimisation step (all processes x accumulation).
        accum_steps: gradient-accumulation micro-steps per optimisation step.
        precision: "fp32", "bf16" (autocast, also on CPU) or "fp16" (autocast + GradScaler).
        device: "auto", "cpu", "cuda" or "cuda:N".
        compile: wrap the method in `torch.compile`.
        num_workers: DataLoader worker processes per training process.
        seed: global seed (data order, augmentation, initialisation).
        log_every_n_steps: scalar logging period.
        ckpt_every_n_epochs: keep `epoch_XXXX.pt` every N epochs (0: only `last.pt`, which is
            rewritten every epoch).
        ckpt_every_n_steps: also rewrite `last.pt` every N steps (0: off), for long epochs.
        resume: "auto" (continue from the newest readable checkpoint in `<run>/checkpoints/`),
            "never", or a path.
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
        precision: str = "bf16",
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
        if precision not in PRECISIONS:
            raise ValueError(f"trainer.precision must be one of {list(PRECISIONS)}, got {precision!r}")
        if strategy not in fsdp.STRATEGIES:
            raise ValueError(f"trainer.strategy must be one of {list(fsdp.STRATEGIES)}, got {strategy!r}")
        if prefetch_factor < 1:
            raise ValueError(f"trainer.prefetch_factor must be >= 1 (batches per worker), got {prefetch_factor}")
        if pin_memory not in (True, False, "auto"):
            raise ValueError(f"trainer.pin_memory must be true, false or auto, got {pin_memory!r}")
        self.max_epochs, self.batch_size, self.accum_steps = max_epochs, batch_size, accum_steps
        self.precision, self.device_name, self.compile = precision, device, compile
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

    def _autocast(self, device: torch.device):
        dtype = PRECISIONS[self.precision]
        if dtype is None:
            return nullcontext()
        return torch.autocast(device_type=device.type, dtype=dtype)

    def _resume_state(self, ckpt_dir: Path, is_main: bool) -> tuple[Path, dict[str, Any]] | None:
        """The checkpoint to continue from: the newest readable one in the run ("auto"), or the
        given path (which must be readable: the user asked for that file)."""
        if self.resume in ("never", "", None):
            return None
        if self.resume == "auto":
            if is_main:
                for p in remove_stale_temporaries(ckpt_dir):
                    log.info("removed %s, left by a process killed while writing it", p)
            return find_resume_checkpoint(ckpt_dir)
        path = Path(self.resume)
        state = load_checkpoint(path)
        check_keys(state, path)
        return path, state

    # ------------------------------------------------------------------ main loop
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
    ) -> dict[str, Any]:
        """Train `method` and return {"step", "epoch", "metrics", "history"}.

        Afterwards `method` holds the trained weights, on the training device (under
        `strategy=fsdp`: on rank 0 only; the other ranks' copy is not updated).

        `evaluate_fn(encoder, epoch)` runs on rank 0 every `eval_every_n_epochs` epochs, except
        after the last one (the caller evaluates the final weights) unless `eval_last_epoch`.
        """
        single = self.strategy == "single"
        rank, world = (0, 1) if single else (vdist.get_rank(), vdist.get_world_size())
        is_main = rank == 0
        logger = logger if (logger is not None and is_main) else NullLogger()
        device = select_device(self.device_name)
        run_dir = Path(run_dir)
        ckpt_dir = run_dir / "checkpoints"
        # under FSDP a sharded copy trains on the device and `method` stays on the CPU (below)
        sharded = self.strategy == "fsdp" and world > 1
        if self.strategy == "fsdp" and world == 1:
            log.info("trainer.strategy=fsdp in a single process: nothing to shard, training unsharded")
        if not sharded:
            method.to(device)
        channels_last = self.channels_last
        if channels_last == "auto":
            channels_last = not getattr(method.encoder, "is_vit", True)
        if channels_last:
            method.to(memory_format=torch.channels_last)

        finish_batch: Callable[[Any], Any] | None = None
        if self.augment_on_device:
            if not hasattr(collate_fn, "deferred"):
                raise ValueError(
                    f"trainer.augment_on_device=true: the collate {type(collate_fn).__name__} cannot defer its "
                    "augmentation to the device; set trainer.augment_on_device=false"
                )
            collate_fn = collate_fn.deferred()
            finish_batch = collate_fn.finish
        micro_bs = self.per_process_batch(world)
        pin = device.type == "cuda" if self.pin_memory == "auto" else bool(self.pin_memory)
        loader, sampler = build_train_loader(
            train_dataset, batch_size=micro_bs, collate_fn=collate_fn, seed=self.seed, rank=rank,
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
        total_steps = steps_per_epoch * self.max_epochs
        global_batch = micro_bs * world * self.accum_steps
        lr_rule = optim.lr_rule(global_batch)
        log.info("%s (%d process(es) x %d images x %d accumulation)", lr_rule, world, micro_bs, self.accum_steps)

        arrays: dict[str, torch.Tensor] = {
            "lr": optim.lr_schedule(global_batch).build(steps_per_epoch, self.max_epochs),
            "wd": optim.wd_schedule().build(steps_per_epoch, self.max_epochs),
        }
        for name, spec in schedules.items():
            arrays[name] = spec.build(steps_per_epoch, self.max_epochs)
        sched_values = {k: v.tolist() for k, v in arrays.items()}  # python floats: no tensor indexing per step

        step, history = 0, []
        resumed = self._resume_state(ckpt_dir, is_main)
        if resumed is not None:
            load_model_state(method, resumed[1]["model"], resumed[0])  # full weights, before any sharding

        # `net` is the module that trains: `method` itself, or under FSDP a sharded copy on the
        # device (`method` then stays unsharded on the CPU and receives the trained weights for
        # evaluation, checkpoints and at the end, see `sync_method`)
        net = method
        if sharded:
            net = fsdp.shard(copy.deepcopy(method).to(device), device)
            log.info("FSDP: %d sharded units + the root over %d processes", len(fsdp.fsdp_units(net)), world)

        optimizer = optim.build(net.param_groups(), device.type)
        scaler = torch.amp.GradScaler(device.type, enabled=self.precision == "fp16")
        trainable = [p for g in optimizer.param_groups for p in g["params"]]

        if resumed is not None:
            resume_from, state = resumed
            if sharded:
                fsdp.load_full_optimizer_state(net, optimizer, state["optimizer"])
            else:
                optimizer.load_state_dict(state["optimizer"])
            scaler.load_state_dict(state["scaler"])
            if state.get("steps_per_epoch") not in (None, steps_per_epoch):
                raise ValueError(
                    f"cannot resume {resume_from}: it had {state['steps_per_epoch']} steps per epoch, this run has "
                    f"{steps_per_epoch}; keep trainer.batch_size, the dataset and the process count unchanged"
                )
            set_rng_state(state["rng"])
            step, history = int(state["step"]), list(state.get("history", []))
            log.info("resumed from %s at step %d (epoch %d)", resume_from, step, step // steps_per_epoch)
            del state
        # TensorBoard hides what an interrupted run logged after the checkpoint's step (whose own
        # values were flushed with it): one value per step
        logger.start(step + 1 if resumed is not None else 0)

        model: nn.Module = net
        if world > 1 and not sharded:
            model = nn.parallel.DistributedDataParallel(
                net, device_ids=[device.index] if device.type == "cuda" else None, broadcast_buffers=False
            )
        if self.compile:
            model = torch.compile(model)

        # collectives, local no-ops under strategy=single (torch.distributed may still be initialised)
        def any_flag(flag: bool) -> bool:
            return flag if single else vdist.all_reduce_max_flag(flag, device)

        def max_int(value: int) -> int:
            return value if single else vdist.all_reduce_max_int(value, device)

        barrier = (lambda: None) if single else vdist.barrier
        wait_for_main = (lambda: None) if single else vdist.wait_for_main

        synced_step = step  # FSDP: the step whose weights `method` holds on rank 0

        def sync_method() -> None:
            """FSDP: `method` on rank 0 gets the trained weights (a collective, once per step at most)."""
            nonlocal synced_step
            if sharded and synced_step != step:
                model_state = fsdp.full_model_state(net)
                if is_main:
                    method.load_state_dict(model_state)
                synced_step = step

        def full_state() -> tuple[dict[str, Any], dict[str, Any]]:
            """Model and optimizer state in the single-process format (under FSDP: gathered on
            rank 0, a collective every process calls)."""
            if sharded:
                sync_method()
                return method.state_dict(), fsdp.full_optimizer_state(net, optimizer)
            return net.state_dict(), optimizer.state_dict()

        def checkpoint(name: str) -> Path:
            path = ckpt_dir / name
            model_state, optim_state = full_state() if (sharded or is_main) else ({}, {})
            if not is_main:
                return path
            state = {
                "model": model_state, "optimizer": optim_state, "scaler": scaler.state_dict(),
                "step": step, "epoch": step // steps_per_epoch, "steps_per_epoch": steps_per_epoch,
                "rng": rng_state(), "history": history, "lr_rule": lr_rule, **(extra_state or {}),
            }
            save_checkpoint(state, path)
            logger.flush()  # what was logged up to this step survives a kill, and is not logged again
            return path

        last_step = total_steps if self.max_steps is None else min(total_steps, self.max_steps)
        start_epoch = step // steps_per_epoch
        metrics: dict[str, float] = {}
        n_overflow = 0
        skipped_files = (lambda: int(train_dataset.num_skipped)) if hasattr(train_dataset, "num_skipped") else None
        net.train()
        with StopOnSignal(self.stop_signals) as stop:
            for epoch in range(start_epoch, self.max_epochs):
                if step >= last_step:
                    break
                skip_micro = (step - epoch * steps_per_epoch) * self.accum_steps
                sampler.set_epoch(epoch, start_batch=skip_micro)
                bar = tqdm(
                    total=steps_per_epoch, initial=step - epoch * steps_per_epoch, desc=f"epoch {epoch + 1}/{self.max_epochs}",
                    disable=not (is_main and self.progress), dynamic_ncols=True, leave=False,
                )
                t_epoch, n_images, loss_sum, n_loss = time.perf_counter(), 0, 0.0, 0
                t_log, images_since_log = time.perf_counter(), 0
                micro = skip_micro
                for batch in loader:
                    if micro >= micro_per_epoch:
                        break  # the ragged tail that does not fill an accumulation group
                    sched = {k: v[step] for k, v in sched_values.items()}
                    set_optimizer_values(optimizer, sched["lr"], sched["wd"])
                    batch = to_device(batch, device)
                    if finish_batch is not None:
                        batch = finish_batch(batch)
                    if channels_last:
                        batch = channels_last_batch(batch)
                    last_micro = (micro + 1) % self.accum_steps == 0
                    if sharded and self.accum_steps > 1:  # no reduce-scatter until the group's last micro-step
                        net.set_requires_gradient_sync(last_micro)
                    sync = model.no_sync() if (world > 1 and not last_micro and hasattr(model, "no_sync")) else nullcontext()
                    with sync:
                        with self._autocast(device):
                            out = model(batch, step, sched)
                        loss = out["loss"]
                        loss_value = float(loss.detach())  # one device sync per micro-step, reused below
                        if any_flag(not math.isfinite(loss_value)):
                            msg = (
                                f"non-finite loss ({loss_value}) at step {step} (epoch {epoch + 1}) on at least "
                                f"one process; lower optim.blr, raise optim.warmup_epochs, or use trainer.precision=fp32/bf16"
                            )
                            raise NonFiniteLossError(msg)
                        scaler.scale(loss / self.accum_steps).backward()
                    micro += 1
                    n_images += micro_bs * world
                    images_since_log += micro_bs * world
                    loss_sum += loss_value
                    n_loss += 1
                    if not last_micro:
                        continue
                    scaler.unscale_(optimizer)
                    grad_norm = clip_gradients(trainable, optim.clip_grad, optim.clip_mode)
                    net.before_optimizer_step(step, sched)
                    scale = scaler.get_scale() if scaler.is_enabled() else 1.0
                    scaler.step(optimizer)  # fp16: skipped when a gradient overflowed
                    scaler.update()
                    if scaler.is_enabled() and scaler.get_scale() < scale:
                        n_overflow += 1
                        log.debug("fp16: gradient overflow at step %d, update skipped, loss scale %g -> %g",
                                  step, scale, scaler.get_scale())
                    optimizer.zero_grad(set_to_none=True)
                    net.on_step_end(step, sched)
                    step += 1
                    bar.update(1)
                    if step % self.log_every_n_steps == 0 or step == last_step:
                        now = time.perf_counter()
                        ips = images_since_log / max(now - t_log, 1e-9)
                        t_log, images_since_log = now, 0
                        values = {f"train/{k}": float(v.detach()) for k, v in out.items()}
                        values.update({f"sched/{k}": v for k, v in sched.items()})
                        values.update({"train/grad_norm": float(grad_norm), "perf/images_per_s": ips})
                        if scaler.is_enabled():
                            values.update({"train/loss_scale": scaler.get_scale(), "train/overflow_steps": n_overflow})
                        logger.log_scalars(values, step)
                        bar.set_postfix(loss=f"{loss_value:.4f}", lr=f"{sched['lr']:.2e}", ips=f"{ips:.0f}")
                    if self.ckpt_every_n_steps and step % self.ckpt_every_n_steps == 0:
                        checkpoint("last.pt")
                    # every process stops after the same step, whichever of them got the signal
                    signum = max_int(stop.signum or 0)
                    if signum:
                        path = checkpoint("last.pt")
                        barrier()  # rank 0 has written it before any process exits
                        raise Preempted(signum, step, str(path))
                    if step >= last_step:
                        break
                bar.close()
                epoch_done = step == (epoch + 1) * steps_per_epoch
                dt = time.perf_counter() - t_epoch
                summary = {
                    "epoch": epoch + 1, "step": step, "loss": loss_sum / max(n_loss, 1),
                    "images_per_s": n_images / max(dt, 1e-9), "seconds": dt,
                }
                if epoch_done and evaluate_fn is not None and eval_every_n_epochs and (epoch + 1) % eval_every_n_epochs == 0 \
                        and (eval_last_epoch or epoch + 1 < self.max_epochs):
                    sync_method()
                    if is_main:
                        if sharded:
                            method.to(device)
                        metrics = evaluate_fn(method.encoder, epoch + 1)
                        logger.log_scalars({f"eval/{k}": v for k, v in metrics.items()}, step)
                        summary.update(metrics)
                        if sharded:
                            method.to("cpu")
                    wait_for_main()
                if skipped_files is not None:  # corrupt inputs replaced by the dataset (bad_files=skip)
                    summary["skipped_files"] = skipped_files()
                history.append(summary)
                if is_main:
                    extra = " | ".join(f"{k} {v:.2f}" for k, v in summary.items() if "/" in k)
                    log.info(
                        "epoch %d/%d | step %d | loss %.4f | %.0f img/s | %.1f s%s", epoch + 1, self.max_epochs, step,
                        summary["loss"], summary["images_per_s"], dt, (" | " + extra) if extra else "",
                    )
                    logger.log_scalars({"epoch/loss": summary["loss"], "epoch/images_per_s": summary["images_per_s"]}, step)
                    if summary.get("skipped_files"):
                        log.warning("%d corrupt training file(s) skipped so far (dataset.bad_files=skip)",
                                    summary["skipped_files"])
                        logger.log_scalars({"data/skipped_files": summary["skipped_files"]}, step)
                checkpoint("last.pt")
                if epoch_done and self.ckpt_every_n_epochs and (epoch + 1) % self.ckpt_every_n_epochs == 0:
                    checkpoint(f"epoch_{epoch + 1:04d}.pt")
                barrier()
        if sharded:
            sync_method()  # a no-op when the last checkpoint was written at this step
            del model, net, optimizer  # free the shards before the caller evaluates `method`
            method.to(device)
        return {"step": step, "epoch": step / steps_per_epoch, "history": history, "lr_rule": lr_rule,
                "finished": step >= total_steps, "steps_per_epoch": steps_per_epoch}
