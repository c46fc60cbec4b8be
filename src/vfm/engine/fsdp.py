"""Fully sharded data parallel training (FSDP2, ``torch.distributed.fsdp.fully_shard``).

With ``trainer.strategy=fsdp`` each process keeps only its 1/world shard of every parameter, its
gradient and its AdamW moments (ZeRO-3), instead of a full replica as under DDP: a ViT-g's ~1.1 B
parameters take ~18 GB of fp32 weights + grads + moments per replica, which FSDP divides by the
number of GPUs. The price is an all-gather of each block's weights before its forward (and again
before its backward) and a reduce-scatter of its gradients.

Units: every transformer block (the children of any ``blocks`` container: timm ViTs and EVAs, the
MAE decoder, the text tower) and every ResNet stage (``layer1`` .. ``layer4``) is its own unit, so
only one block's full weights exist at a time; everything else (embeddings, heads, norms) belongs to
the root unit, gathered for the whole step. EMA teachers are sharded like their students, so the
EMA update is a purely local operation on matching shards.

Checkpoints stay in the single-process format: the trainer gathers full state dicts on rank 0
(:func:`full_model_state`, :func:`full_optimizer_state`, the optimizer state keyed by parameter
index like ``optimizer.state_dict()``), so a run can resume under DDP, FSDP or one process
whatever wrote it, and exported weights load into plain ``timm`` models.

Precision is unchanged: parameters are gathered in fp32 and autocast casts them per op, exactly
as under DDP, so both strategies compute the same step.
"""

from __future__ import annotations

import re
from typing import Any

import torch
from torch import nn

__all__ = [
    "fsdp_units",
    "full_model_state",
    "full_optimizer_state",
    "load_full_optimizer_state",
    "shard",
]

_STAGE = re.compile(r"layer\d+")


def fsdp_units(module: nn.Module) -> list[nn.Module]:
    """The submodules that become their own FSDP units (see the module docstring), outermost first."""
    units: list[nn.Module] = []
    for name, child in module.named_modules():
        leaf = name.rsplit(".", 1)[-1]
        if leaf == "blocks" and isinstance(child, (nn.ModuleList, nn.Sequential)):
            units.extend(child.children())
        elif _STAGE.fullmatch(leaf) and isinstance(child, nn.Sequential):
            units.append(child)
    return units


def shard(module: nn.Module, device: torch.device) -> nn.Module:
    """Shard ``module`` (already on ``device``) in place over all processes; returns it.

    Its parameters become ``DTensor`` shards: build the optimizer afterwards. Its ``forward`` must
    be what runs the step (the root unit gathers its parameters in a forward pre-hook).
    """
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(device.type, (torch.distributed.get_world_size(),))
    # FSDP2 cannot shard 0-d parameters (CLIP's logit_scale): they become [1] here, and the state
    # dicts below turn them back, so checkpoints keep the single-process shapes
    scalars = []
    for mod_name, mod in module.named_modules():
        for name, p in list(mod.named_parameters(recurse=False)):
            if p.ndim == 0:
                setattr(mod, name, nn.Parameter(p.detach().reshape(1), requires_grad=p.requires_grad))
                scalars.append(f"{mod_name}.{name}" if mod_name else name)
    module._vfm_scalar_params = frozenset(scalars)
    for unit in fsdp_units(module):
        fully_shard(unit, mesh=mesh)
    fully_shard(module, mesh=mesh)
    return module


def _options():
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, cpu_offload=True)


def full_model_state(module: nn.Module) -> dict[str, torch.Tensor]:
    """The unsharded state dict on rank 0 (CPU tensors; empty on the other ranks). Collective."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    state = get_model_state_dict(module, options=_options())
    for name in _scalars(module):
        if name in state:
            state[name] = state[name].reshape(())
    return state


def _scalars(module: nn.Module) -> frozenset[str]:
    return getattr(module, "_vfm_scalar_params", frozenset())


def _reshape_moments(state: dict[str, Any], names: list[str], scalars: frozenset[str], shape: tuple[int, ...]) -> None:
    """Per-parameter optimizer tensors of the 0-d parameters (moments, not the step count) to ``shape``."""
    for i, s in state.items():
        if names[i] in scalars:
            state[i] = {k: v.reshape(shape) if (torch.is_tensor(v) and k != "step") else v for k, v in s.items()}


def _param_names(module: nn.Module, optimizer: torch.optim.Optimizer) -> list[str]:
    """The parameter names in ``optimizer.state_dict()``'s index order."""
    name_of = {id(p): n for n, p in module.named_parameters()}
    return [name_of[id(p)] for g in optimizer.param_groups for p in g["params"]]


def full_optimizer_state(module: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """The unsharded optimizer state on rank 0, keyed like ``optimizer.state_dict()`` (parameter
    indices, not names), so that it loads into an unsharded optimizer too. Collective."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    by_name = get_optimizer_state_dict(module, optimizer, options=_options())
    if not by_name:  # ranks other than 0
        return {}
    index = {n: i for i, n in enumerate(_param_names(module, optimizer))}
    groups = [{**g, "params": [index[n] for n in g["params"]]} for g in by_name["param_groups"]]
    state = {index[n]: s for n, s in by_name["state"].items()}
    _reshape_moments(state, list(index), _scalars(module), ())
    return {"state": state, "param_groups": groups}


def load_full_optimizer_state(module: nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
    """Load an unsharded ``optimizer.state_dict()`` (every rank passes the same one) into the
    optimizer of the sharded ``module``: each rank keeps its shard of the moments."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    names = _param_names(module, optimizer)
    if len(names) != sum(len(g["params"]) for g in state["param_groups"]):
        raise ValueError(
            f"the checkpoint's optimizer has {sum(len(g['params']) for g in state['param_groups'])} parameters, "
            f"this model {len(names)}; was it written with the same method/backbone config?"
        )
    per_param = dict(state["state"])
    _reshape_moments(per_param, names, _scalars(module), (1,))
    by_name = {
        "state": {names[i]: s for i, s in per_param.items()},
        "param_groups": [{**g, "params": [names[i] for i in g["params"]]} for g in state["param_groups"]],
    }
    # strict=False: parameters that have not been updated yet have no state (DINO's last layer is
    # frozen for the first epoch). Loading initialises every state with a zero-lr step, so those
    # are dropped again: their first real step must see step count 0, as without the interruption.
    set_optimizer_state_dict(module, optimizer, by_name, options=StateDictOptions(full_state_dict=True, strict=False))
    params = [p for g in optimizer.param_groups for p in g["params"]]
    for i, p in enumerate(params):
        if i not in state["state"]:
            optimizer.state.pop(p, None)
