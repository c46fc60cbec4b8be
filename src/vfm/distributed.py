"""Leaf helpers for torchrun/DDP: initialisation from the environment, rank queries and collectives.

Processes find each other from torchrun's variables (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR,
MASTER_PORT) or, without them, from SLURM's when each process is one task of a multi-task step
(`srun --ntasks-per-node=8 python -m vfm.pretrain ...`, hydra's submitit launcher): see `slurm_env`.

Everything here is a no-op in a single process, so methods and losses can call `all_reduce_mean`
or `all_gather_with_grad` unconditionally and stay correct under DDP.
"""

from __future__ import annotations

import datetime
import os
import re
import shutil
import subprocess
from collections.abc import Mapping
from typing import Any

import torch
import torch.distributed as dist


def is_dist() -> bool:
    return dist.is_available() and dist.is_initialized()


def get_rank() -> int:
    return dist.get_rank() if is_dist() else 0


def get_world_size() -> int:
    return dist.get_world_size() if is_dist() else 1


def is_main_process() -> bool:
    return get_rank() == 0


# MASTER_PORT under SLURM: a port per job id, so that two jobs sharing a node do not collide
SLURM_PORT_BASE = 20000
SLURM_PORT_SPAN = 20000


def _split_top_level(nodelist: str) -> list[str]:
    """Split a SLURM host list at the commas outside brackets: "a[1,3],b" -> ["a[1,3]", "b"]."""
    return [part for part in re.split(r",(?![^\[]*\])", nodelist) if part]


def _expand_ranges(body: str) -> list[str]:
    """The values of one bracket group, zero padding kept: "01-03,07" -> ["01", "02", "03", "07"]."""
    values: list[str] = []
    for item in body.split(","):
        lo, _, hi = item.partition("-")
        if not hi:
            values.append(lo)
            continue
        width = len(lo) if lo.startswith("0") else 0
        values.extend(str(i).zfill(width) for i in range(int(lo), int(hi) + 1))
    return values


def expand_nodelist(nodelist: str) -> list[str]:
    """Host names of a compressed SLURM host list (`node[01-03,07],gpu5` -> node01 node02 node03
    node07 gpu5), for machines without `scontrol`; several bracket groups in one name
    (`rack[1-2]-n[1-2]`) expand as their product, in SLURM's order."""
    hosts: list[str] = []
    for part in _split_top_level(nodelist):
        names = [""]
        for text, body in re.findall(r"([^\[]*)(?:\[([^\]]*)\])?", part):
            values = _expand_ranges(body) if body else [""]
            names = [n + text + v for n in names for v in values]
        hosts.extend(names)
    return hosts


def first_host(nodelist: str) -> str:
    """The first host of a SLURM host list: the rendezvous host (rank 0 runs there, as SLURM
    places task 0 on the first node). Asks `scontrol show hostnames` when it exists, since
    it knows every site's syntax; the parser above covers the common forms otherwise."""
    if shutil.which("scontrol"):
        try:
            out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True,
                                 text=True, timeout=30, check=True).stdout.split()
            if out:
                return out[0]
        except (OSError, subprocess.SubprocessError):
            pass
    return expand_nodelist(nodelist)[0]


def _is_slurm_task(env: Mapping[str, str]) -> bool:
    """One task of a multi-task SLURM step, not launched by torchrun (see `slurm_env`)."""
    if "RANK" in env or "WORLD_SIZE" in env:
        return False
    return "SLURM_PROCID" in env and int(env.get("SLURM_NTASKS", "1")) > 1


def slurm_env(environ: Mapping[str, str] | None = None) -> dict[str, str] | None:
    """torchrun-style variables derived from SLURM's, or None where they do not apply.

    They apply when the process is one task of a multi-task SLURM step (SLURM_NTASKS > 1 and
    SLURM_PROCID set: `srun --ntasks-per-node=8 python -m vfm.pretrain`, or hydra's submitit
    launcher with tasks_per_node > 1) and torchrun's RANK / WORLD_SIZE are absent. torchrun's
    variables win: a single-task sbatch or an srun per node that runs torchrun must keep
    torchrun's ranks, not the SLURM task's. MASTER_ADDR / MASTER_PORT already in the
    environment are kept (overrides); otherwise the first host of the step's node list and
    20000 + SLURM_JOB_ID % 20000.
    """
    env = os.environ if environ is None else environ
    if not _is_slurm_task(env):
        return None
    nodelist = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST")
    if "MASTER_ADDR" in env:
        addr = env["MASTER_ADDR"]
    elif nodelist:
        addr = first_host(nodelist)
    else:
        addr = "127.0.0.1"
    port = env.get("MASTER_PORT") or str(SLURM_PORT_BASE + int(env.get("SLURM_JOB_ID", "0")) % SLURM_PORT_SPAN)
    return {
        "RANK": env["SLURM_PROCID"],
        "WORLD_SIZE": env["SLURM_NTASKS"],
        "LOCAL_RANK": env.get("SLURM_LOCALID", "0"),
        "MASTER_ADDR": addr,
        "MASTER_PORT": port,
    }


def env_world_size() -> int:
    """World size announced by torchrun or a multi-task SLURM step, readable before the process
    group exists (config validation checks the global batch divides over it)."""
    if _is_slurm_task(os.environ):
        return int(os.environ["SLURM_NTASKS"])
    return int(os.environ.get("WORLD_SIZE", "1"))


def _cuda_index(local_rank: int) -> int:
    """This process's GPU: its local rank, modulo the visible devices, since SLURM may bind one
    GPU per task (`--gpus-per-task=1`, `--gpu-bind`), which every task then sees as device 0."""
    return local_rank % max(torch.cuda.device_count(), 1)


def init_distributed(device_type: str, timeout_s: float = 600.0) -> tuple[int, int, int]:
    """Initialise the default process group from torchrun's (or a SLURM step's) environment.

    Returns (rank, local_rank, world_size). Uses NCCL on CUDA and gloo on CPU. Without either's
    variables it returns (0, 0, 1) and creates no group. SLURM's are exported as torchrun's
    first (os.environ, setdefault), so `init_process_group`'s env:// rendezvous reads them.
    """
    for key, value in (slurm_env() or {}).items():
        os.environ.setdefault(key, value)
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return 0, 0, 1
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if not is_dist():
        backend = "nccl" if device_type == "cuda" else "gloo"
        if device_type == "cuda":
            torch.cuda.set_device(_cuda_index(local_rank))
        dist.init_process_group(
            backend=backend, rank=rank, world_size=world, timeout=datetime.timedelta(seconds=timeout_s)
        )
        global _WAIT_GROUP
        # a second group, for waiting on rank 0's evaluations: they may take hours (ImageNet kNN,
        # fine-tuning) while the training collectives must notice a dead process in minutes
        _WAIT_GROUP = dist.new_group(backend="gloo", timeout=datetime.timedelta(seconds=WAIT_FOR_MAIN_TIMEOUT_S))
    return rank, local_rank, world


WAIT_FOR_MAIN_TIMEOUT_S = 48 * 3600.0
_WAIT_GROUP: dist.ProcessGroup | None = None


def barrier() -> None:
    """All processes meet; fails after the process group's timeout (trainer.dist_timeout_s)."""
    if is_dist():
        dist.barrier()


def wait_for_main() -> None:
    """All processes meet after rank 0 has done work alone (evaluation), however long it took."""
    if is_dist():
        dist.barrier(group=_WAIT_GROUP)


def destroy() -> None:
    global _WAIT_GROUP
    if is_dist():
        dist.destroy_process_group()
    _WAIT_GROUP = None


@torch.no_grad()
def broadcast_buffers(module: torch.nn.Module, src: int = 0) -> None:
    """Overwrite every buffer of `module` (e.g. BatchNorm running statistics, which each process
    updates from its own batches) with rank `src`'s, so all processes hold the same model."""
    if not is_dist():
        return
    for buf in module.buffers():
        dist.broadcast(buf, src)


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank `src`'s `obj` (a small picklable value, e.g. a decision) on every process; every
    process must call it. In a single process, `obj` itself."""
    if not is_dist():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def all_reduce_mean(x: torch.Tensor) -> torch.Tensor:
    """Mean of `x` over processes (in place on a copy; the input is left untouched)."""
    if not is_dist():
        return x
    y = x.clone()
    dist.all_reduce(y, op=dist.ReduceOp.SUM)
    return y / get_world_size()


def all_reduce_sum(x: torch.Tensor) -> torch.Tensor:
    if not is_dist():
        return x
    y = x.clone()
    dist.all_reduce(y, op=dist.ReduceOp.SUM)
    return y


def all_reduce_max_flag(flag: bool, device: torch.device | str = "cpu") -> bool:
    """True on every rank if `flag` is true on any rank (used to stop all processes together)."""
    if not is_dist():
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)


def all_reduce_max_int(value: int, device: torch.device | str = "cpu") -> int:
    """The largest `value` over all processes (e.g. the number of a signal one of them received)."""
    if not is_dist():
        return value
    t = torch.tensor([value], dtype=torch.int64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t.item())


class _GatherWithGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor) -> tuple[torch.Tensor, ...]:  # type: ignore[override]
        out = [torch.empty_like(x) for _ in range(get_world_size())]
        dist.all_gather(out, x.contiguous())
        return tuple(out)

    @staticmethod
    def backward(ctx, *grads: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        # Every rank computed a loss over the full gathered batch: sum their gradients, keep ours.
        g = torch.stack(grads)
        dist.all_reduce(g, op=dist.ReduceOp.SUM)
        return g[get_rank()]


def all_gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """Concatenate `x` [B, ...] from all processes along dim 0, letting gradients flow back."""
    if not is_dist():
        return x
    return torch.cat(_GatherWithGrad.apply(x), dim=0)


@torch.no_grad()
def all_gather(x: torch.Tensor) -> torch.Tensor:
    """Concatenate `x` [B, ...] from all processes along dim 0 (no gradient)."""
    if not is_dist():
        return x
    out = [torch.empty_like(x) for _ in range(get_world_size())]
    dist.all_gather(out, x.contiguous())
    return torch.cat(out, dim=0)
