"""Load a pretrained encoder from a file, without a config: the teacher of EVA and of the VQ-KD
tokenizer, and the checkpoints `evaluate` reads.

Accepted, in order of preference:
- a run directory of `pretrain` (its `encoder.safetensors`, else `checkpoints/last.pt`);
- a `.safetensors` file written by `Backbone.export` (architecture in its metadata);
- a `last.pt` / periodic checkpoint of `pretrain` (architecture from the config stored inside);
- any other timm-loadable weight file (`.safetensors`, `.pt`, `.pth`, `.bin`) together with the
  timm model name (`model_name=`), converted by timm's own checkpoint filter — e.g. an open_clip or
  OpenAI CLIP image tower for `vit_base_patch16_clip_224`.

`.pt`-style files are read by `vfm.io.load_torch`: weights only, never code from the file.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import torch
from torch import nn

from vfm.backbones.timm_backbone import Backbone, exported_metadata
from vfm.io import UnreadableFileError, load_torch


class EncoderLoadError(ValueError):
    """A weight file that cannot be turned into an encoder; the message names the file and the fix."""


def load_pretrained_encoder(
    path: str | Path, *, model_name: str | None = None, model_kwargs: dict[str, Any] | None = None
) -> Backbone:
    """A `Backbone` with the weights stored at `path` (see the module docstring), on the CPU, in eval mode."""
    return load_pretrained_encoder_and_projection(path, model_name=model_name, model_kwargs=model_kwargs)[0]


def load_pretrained_encoder_and_projection(
    path: str | Path, *, model_name: str | None = None, model_kwargs: dict[str, Any] | None = None
) -> tuple[Backbone, nn.Linear | None]:
    """The encoder (as `load_pretrained_encoder`) and the image projection stored with it, or None.

    The projection is a CLIP image tower's map onto the image-text space, which feature teachers
    (EVA, VQ-KD) apply to every patch token: timm's `head` of a foreign CLIP file (OpenAI's
    `visual.proj`, open_clip's `visual.proj`, converted by timm's checkpoint filter) or the
    `image_projection` of a `method=clip` checkpoint (pass its `checkpoints/last.pt`: a run
    directory resolves to `encoder.safetensors`, which holds the encoder only). A classifier head of a foreign file is returned the same way: callers that
    want the encoder alone use `load_pretrained_encoder`.
    """
    path = Path(path)
    if path.is_dir():
        for candidate in (path / "encoder.safetensors", path / "checkpoints" / "last.pt"):
            if candidate.is_file():
                return load_pretrained_encoder_and_projection(candidate, model_name=model_name, model_kwargs=model_kwargs)
        raise EncoderLoadError(f"{path} holds neither encoder.safetensors nor checkpoints/last.pt; is it a pretrain run directory?")
    if not path.is_file():
        raise EncoderLoadError(f"encoder weights {path} do not exist; pass a pretrain run directory, its "
                               "encoder.safetensors or checkpoints/last.pt")
    if path.suffix == ".safetensors" and exported_metadata(path) is not None:
        return Backbone.from_exported(path).eval(), None
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return _from_foreign_state(load_file(str(path)), path, model_name, model_kwargs)
    try:
        state = load_torch(path)  # a file that would run code: UntrustedFileError, a config error
    except UnreadableFileError as e:
        raise EncoderLoadError(str(e)) from e
    if isinstance(state, dict) and "config" in state and "encoder_prefix" in state:
        node = dict(state["config"]["backbone"])
        node.pop("_target_", None)
        node["pretrained"] = False
        backbone = Backbone(**node)
        prefix = state["encoder_prefix"]
        enc = {k[len(prefix):]: v for k, v in state["model"].items() if k.startswith(prefix)}
        if "mask_token" in enc:  # trained by a masking method (iBOT, BEiT, EVA): keep it
            backbone.enable_mask_token()
        missing, unexpected = backbone.load_state_dict(enc, strict=False)
        if missing or unexpected:
            raise EncoderLoadError(f"{path}: encoder weights do not match its stored backbone config "
                                   f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
        return backbone.eval(), _linear_from(state["model"], "image_projection.")
    if isinstance(state, dict) and isinstance(state.get("state_dict", state.get("model")), dict):
        state = state.get("state_dict", state.get("model"))
    if not isinstance(state, dict):
        raise EncoderLoadError(f"{path} holds a {type(state).__name__}, not a state dict or a pretrain checkpoint")
    return _from_foreign_state(state, path, model_name, model_kwargs)


def _linear_from(state: dict[str, torch.Tensor], prefix: str) -> nn.Linear | None:
    """nn.Linear from `{prefix}weight` [out, in] (and `{prefix}bias`) of `state`, or None without it."""
    weight = state.get(prefix + "weight")
    if weight is None or weight.ndim != 2:
        return None
    bias = state.get(prefix + "bias")
    linear = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None)
    with torch.no_grad():
        linear.weight.copy_(weight)
        if bias is not None:
            linear.bias.copy_(bias)
    return linear.eval()


def _from_foreign_state(
    state: dict[str, torch.Tensor], path: Path, model_name: str | None, model_kwargs: dict[str, Any] | None
) -> tuple[Backbone, nn.Linear | None]:
    if not model_name:
        raise EncoderLoadError(f"{path} carries no architecture; name the timm model it belongs to "
                               "(e.g. vit_base_patch16_clip_224 for an open_clip ViT-B/16 image tower)")
    backbone = Backbone.from_create_kwargs(model_name, model_kwargs or {})
    # timm's own filter for the model's family converts open_clip / OpenAI CLIP / EVA-CLIP /
    # original-repo key layouts to timm's (OpenAI's `proj` becomes `head.weight`)
    family = sys.modules[type(backbone.model).__module__]
    if backbone.is_vit and callable(getattr(family, "checkpoint_filter_fn", None)):
        state = family.checkpoint_filter_fn(state, backbone.model)
    head = _linear_from(state, "head.")
    state = {k: v for k, v in state.items() if not k.startswith("head.")}  # the encoder is built without it
    try:
        backbone.model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise EncoderLoadError(f"{path} does not match timm model {model_name}: {str(e)[:500]}") from e
    return backbone.eval(), head
