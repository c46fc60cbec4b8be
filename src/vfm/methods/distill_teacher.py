"""The frozen DINO-family heads of a distillation teacher, read from a `pretrain` checkpoint.

A `checkpoints/last.pt` of `method=dino`, `ibot` or `dinov2` stores the whole method: its EMA
teacher's backbone (the exported encoder, at `encoder_prefix`) and next to it that teacher's heads,
under the tower's names (DINO: `head`; iBOT: `head`, `patch_head`; DINOv2: `dino_head`, `ibot_head`),
built from the method config stored with them. `load_teacher_heads` rebuilds those heads; the
encoder itself is read by `vfm.backbones.loading.load_pretrained_encoder`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vfm.heads.dino_head import DINOHead
from vfm.io import load_torch

# (the [CLS] head's names, the separate patch head's names) in the towers of DINO, iBOT and DINOv2
CLS_HEADS, PATCH_HEADS = ("head", "dino_head"), ("patch_head", "ibot_head")


@dataclass
class TeacherHeads:
    """The teacher's DINO head (None: the file has none), its patch head (None: no patch objective;
    the DINO head itself when shared), whether that one is separate, and the heads' architecture."""

    dino: DINOHead | None = None
    patch: DINOHead | None = None
    separate_patch: DINOHead | None = None
    head_kwargs: dict[str, Any] = field(default_factory=dict)

    @property
    def out_dim(self) -> int:
        return int(self.dino.last_layer_v.shape[0])

    @property
    def patch_out_dim(self) -> int:
        return int(self.patch.last_layer_v.shape[0])


def _checkpoint_state(path: str | Path) -> dict[str, Any] | None:
    """The pretrain checkpoint at `path` (a run directory or a .pt file), None when it is not one."""
    path = Path(path)
    if path.is_dir():
        path = path / "checkpoints" / "last.pt"
    if not path.is_file() or path.suffix != ".pt":
        return None
    state = load_torch(path)
    if isinstance(state, dict) and {"config", "encoder_prefix", "model"} <= set(state):
        return state
    return None


def load_teacher_heads(path: str | Path, embed_dim: int) -> TeacherHeads:
    """The frozen heads stored in the pretrain checkpoint at `path` (a run directory or its
    `checkpoints/last.pt`), on the teacher encoder's width `embed_dim`; empty `TeacherHeads` for
    any other file (an exported encoder, timm weights) or a method without DINO heads."""
    state = _checkpoint_state(path)
    if state is None:
        return TeacherHeads()
    tower = state["encoder_prefix"].removesuffix("backbone.")
    method = state["config"]["method"]
    kwargs = dict(hidden_dim=method["hidden_dim"], bottleneck_dim=method["bottleneck_dim"],
                  nlayers=method["head_layers"], use_bn=method["use_bn_in_head"],
                  norm_last_layer=method["norm_last_layer"]) if "head_layers" in method else {}

    def head(names: tuple[str, ...], out_dim: int | None) -> DINOHead | None:
        for name in names:
            prefix = f"{tower}{name}."
            weights = {k[len(prefix):]: v for k, v in state["model"].items() if k.startswith(prefix)}
            if weights:
                module = DINOHead(embed_dim, int(out_dim), **kwargs)
                module.load_state_dict(weights)
                return module.eval()
        return None

    if not kwargs or (dino := head(CLS_HEADS, method.get("out_dim"))) is None:
        return TeacherHeads()
    separate = head(PATCH_HEADS, method.get("patch_out_dim"))
    shared = method.get("shared_head") is True or method.get("separate_heads") is False  # iBOT / DINOv2 options
    patch = separate if separate is not None else (dino if shared else None)
    return TeacherHeads(dino=dino, patch=patch, separate_patch=separate, head_kwargs=kwargs)
