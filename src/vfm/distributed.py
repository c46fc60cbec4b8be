"""Leaf helpers for torchrun/DDP: initialisation from the environment, rank queries and collectives.

Everything here is a no-op in a single process, so methods and losses can call `all_reduce_mean`
or `all_gather_with_grad` unconditionally and stay correct under DDP.
"""

from __future__ import annotations

import datetime
import os

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


def env_world_size() -> int:
    """World size announced by torchrun, readable before the process group exists (for validation)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def init_distributed(device_type: str, timeout_s: float = 600.0) -> tuple[int, int, int]:
    """Initialise the default process group from torchrun's environment variables.

    Returns (rank, local_rank, world_size). Uses NCCL on CUDA and gloo on CPU. Without torchrun's
    variables it returns (0, 0, 1) and creates no group.
    """
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return 0, 0, 1
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if not is_dist():
        backend = "nccl" if device_type == "cuda" else "gloo"
        if device_type == "cuda":
            torch.cuda.set_device(local_rank)
        dist.init_process_group(
            backend=backend, rank=rank, world_size=world, timeout=datetime.timedelta(seconds=timeout_s)
        )
    return rank, local_rank, world


def barrier() -> None:
    if is_dist():
        dist.barrier()


def destroy() -> None:
    if is_dist():
        dist.destroy_process_group()


@torch.no_grad()
def broadcast_buffers(module: torch.nn.Module, src: int = 0) -> None:
    """Overwrite every buffer of `module` (e.g. BatchNorm running statistics, which each process
    updates from its own batches) with rank `src`'s, so all processes hold the same model."""
    if not is_dist():
        return
    for buf in module.buffers():
        dist.broadcast(buf, src)


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
