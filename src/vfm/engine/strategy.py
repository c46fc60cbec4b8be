"""How the processes of a run share one training: the trainer's loop is written once, against
`SingleProcess`; `DDP` and `FSDP` override what differs.

A strategy owns
- wrapping: `wrap(method)` returns the module that trains (`net`: its `param_groups`,
  `before_optimizer_step`, `on_step_end`), and `model`, what runs the forward (a DDP wrapper);
- gradient synchronisation under accumulation (`accumulating`: DDP's `no_sync`, FSDP's
  reduce-scatter held back until the group's last micro-step);
- the full state in the single-process format, for checkpoints (`full_state`), for rank 0's
  evaluations (`evaluation_method`) and at the end (`finish`), and loading an optimizer state;
- the collectives of the loop (`all_reduce_max_flag`, `all_reduce_max_int`, `barrier`,
  `wait_for_main`), so that every process takes the same decision at the same step.

`SingleProcess` issues no collective, even when torch.distributed is initialised: rank 0 of a
run can train alone (fine-tuning) while the other ranks wait. The method's own collectives
(`vfm.distributed`: DINO's center, CLIP's gathered logits) do not ask the strategy, so a method
trained this way inside a process group must compute its loss locally, as a classifier does.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from typing import Any

import torch
from torch import nn

from vfm import distributed as vdist
from vfm.engine import fsdp

log = logging.getLogger(__name__)

StateDicts = tuple[dict[str, Any], dict[str, Any]]


class SingleProcess:
    """Everything in this process: the method trains in place on `device`."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.rank, self.world = 0, 1
        self.method: nn.Module | None = None
        self.net: nn.Module | None = None
        self.model: nn.Module | None = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    # ------------------------------------------------------------------ wrapping
    def wrap(self, method: nn.Module) -> nn.Module:
        """Place `method` on the device and return the module that trains (`self.net`); the
        forward runs through `self.model`. Build the optimizer afterwards."""
        self.method = self.net = self.model = method.to(self.device)
        return self.net

    def start(self, step: int) -> None:
        """Training starts (or resumes) at `step`: `method` holds that step's weights."""

    def accumulating(self, last_micro: bool) -> AbstractContextManager:
        """The context of one micro-step's forward and backward: gradients are synchronised
        over the processes only on the last micro-step of an accumulation group."""
        return nullcontext()

    def load_optimizer_state(self, optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
        """Load a single-process `optimizer.state_dict()` (every process passes the same one)."""
        optimizer.load_state_dict(state)

    # ------------------------------------------------------------------ full state
    def full_state(self, optimizer: torch.optim.Optimizer, step: int) -> StateDicts:
        """Model and optimizer state dicts in the single-process format on rank 0 (empty
        elsewhere); every process calls it (a collective under FSDP)."""
        if not self.is_main:
            return {}, {}
        return self.net.state_dict(), optimizer.state_dict()

    @contextmanager
    def evaluation_method(self, step: int) -> Iterator[nn.Module | None]:
        """The trained method on the device, on rank 0 (None elsewhere); every process enters."""
        yield self.method if self.is_main else None

    def finish(self, step: int) -> None:
        """After the last step: `method` holds the trained weights on the device."""

    # ------------------------------------------------------------------ collectives
    def all_reduce_max_flag(self, flag: bool) -> bool:
        return flag

    def all_reduce_max_int(self, value: int) -> int:
        return value

    def broadcast_object(self, obj: Any) -> Any:
        """Rank 0's `obj` (a small picklable value) on every process; every process calls it."""
        return obj

    def barrier(self) -> None:
        pass

    def wait_for_main(self) -> None:
        pass


class DDP(SingleProcess):
    """A full replica per process; gradients all-reduced during the backward."""

    def __init__(self, device: torch.device) -> None:
        super().__init__(device)
        self.rank, self.world = vdist.get_rank(), vdist.get_world_size()
        self._ddp: nn.parallel.DistributedDataParallel | None = None

    def wrap(self, method: nn.Module) -> nn.Module:
        net = super().wrap(method)
        device_ids = [self.device.index] if self.device.type == "cuda" else None
        self.model = self._ddp = nn.parallel.DistributedDataParallel(net, device_ids=device_ids, broadcast_buffers=False)
        return net

    def accumulating(self, last_micro: bool) -> AbstractContextManager:
        return nullcontext() if last_micro else self._ddp.no_sync()

    def all_reduce_max_flag(self, flag: bool) -> bool:
        return vdist.all_reduce_max_flag(flag, self.device)

    def all_reduce_max_int(self, value: int) -> int:
        return vdist.all_reduce_max_int(value, self.device)

    def broadcast_object(self, obj: Any) -> Any:
        return vdist.broadcast_object(obj, src=0)

    def barrier(self) -> None:
        vdist.barrier()

    def wait_for_main(self) -> None:
        vdist.wait_for_main()


class FSDP(DDP):
    """FSDP2 (`vfm.engine.fsdp`): a sharded copy of the method trains on the device while
    `method` stays unsharded on the CPU; rank 0's `method` receives the trained weights when
    they are needed (a collective, gathered once per step at most)."""

    def __init__(self, device: torch.device, accum_steps: int) -> None:
        super().__init__(device)
        self.accum_steps = accum_steps
        self._synced_step: int | None = None

    def wrap(self, method: nn.Module) -> nn.Module:
        self.method = method
        self.net = self.model = fsdp.shard(copy.deepcopy(method).to(self.device), self.device)
        log.info("FSDP: %d sharded units + the root over %d processes", len(fsdp.fsdp_units(self.net)), self.world)
        return self.net

    def start(self, step: int) -> None:
        self._synced_step = step

    def accumulating(self, last_micro: bool) -> AbstractContextManager:
        if self.accum_steps > 1:  # no reduce-scatter until the group's last micro-step
            self.net.set_requires_gradient_sync(last_micro)
        return nullcontext()

    def load_optimizer_state(self, optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
        fsdp.load_full_optimizer_state(self.net, optimizer, state)

    def _sync_method(self, step: int) -> None:
        """Rank 0's `method` gets the weights of `step` (a collective, once per step at most)."""
        if self._synced_step != step:
            model_state = fsdp.full_model_state(self.net)
            if self.is_main:
                self.method.load_state_dict(model_state)
            self._synced_step = step

    def full_state(self, optimizer: torch.optim.Optimizer, step: int) -> StateDicts:
        self._sync_method(step)
        return self.method.state_dict(), fsdp.full_optimizer_state(self.net, optimizer)

    @contextmanager
    def evaluation_method(self, step: int) -> Iterator[nn.Module | None]:
        self._sync_method(step)
        if not self.is_main:
            yield None
            return
        self.method.to(self.device)
        yield self.method
        self.method.to("cpu")

    def finish(self, step: int) -> None:
        self._sync_method(step)  # a no-op when the last checkpoint was written at this step
        self.net = self.model = None  # free the shards before the caller evaluates `method`
        self.method.to(self.device)


STRATEGIES = ("ddp", "fsdp", "single")


def build_strategy(name: str, device: torch.device, accum_steps: int = 1) -> SingleProcess:
    """The strategy `name` (one of `STRATEGIES`) for this process; with one process, whatever
    the name, `SingleProcess`."""
    if name not in STRATEGIES:
        raise ValueError(f"trainer.strategy must be one of {list(STRATEGIES)}, got {name!r}")
    if name == "single" or vdist.get_world_size() == 1:
        if name == "fsdp":
            log.info("trainer.strategy=fsdp in a single process: nothing to shard, training unsharded")
        return SingleProcess(device)
    return DDP(device) if name == "ddp" else FSDP(device, accum_steps)
