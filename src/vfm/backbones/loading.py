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

from pathlib import Path
from typing import Any

import torch

from vfm.backbones.timm_backbone import Backbone, exported_metadata
from vfm.io import UnreadableFileError, load_torch


class EncoderLoadError(ValueError):
    """A weight file that cannot be turned into an encoder; the message names the file and the fix."""


def load_pretrained_encoder(
    path: str | Path, *, model_name: str | None = None, model_kwargs: dict[str, Any] | None = None
) -> Backbone:
    """A `Backbone` with the weights stored at `path` (see the module docstring), on the CPU, in eval mode."""
    path = Path(path)
    if path.is_dir():
        for candidate in (path / "encoder.safetensors", path / "checkpoints" / "last.pt"):
            if candidate.is_file():
                return load_pretrained_encoder(candidate, model_name=model_name, model_kwargs=model_kwargs)
        raise EncoderLoadError(f"{path} holds neither encoder.safetensors nor checkpoints/last.pt; is it a pretrain run directory?")
    if not path.is_file():
        raise EncoderLoadError(f"encoder weights {path} do not exist; pass a pretrain run directory, its "
                               "encoder.safetensors or checkpoints/last.pt")
    if path.suffix == ".safetensors" and exported_metadata(path) is not None:
        return Backbone.from_exported(path).eval()
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
        return backbone.eval()
    if isinstance(state, dict) and isinstance(state.get("state_dict", state.get("model")), dict):
        state = state.get("state_dict", state.get("model"))
    if not isinstance(state, dict):
        raise EncoderLoadError(f"{path} holds a {type(state).__name__}, not a state dict or a pretrain checkpoint")
    return _from_foreign_state(state, path, model_name, model_kwargs)


def _from_foreign_state(
    state: dict[str, torch.Tensor], path: Path, model_name: str | None, model_kwargs: dict[str, Any] | None
) -> Backbone:
    if not model_name:
        raise EncoderLoadError(f"{path} carries no architecture; name the timm model it belongs to "
                               "(e.g. vit_base_patch16_clip_224 for an open_clip ViT-B/16 image tower)")
    from timm.models import vision_transformer

    backbone = Backbone.from_create_kwargs(model_name, model_kwargs or {})
    if backbone.is_vit:  # converts open_clip / OpenAI CLIP / original-repo key layouts to timm's
        state = vision_transformer.checkpoint_filter_fn(state, backbone.model)
    state = {k: v for k, v in state.items() if not k.startswith("head.")}  # classifier heads are not the encoder
    try:
        backbone.model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise EncoderLoadError(f"{path} does not match timm model {model_name}: {str(e)[:500]}") from e
    return backbone.eval()
