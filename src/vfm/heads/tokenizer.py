"""Visual tokenizers: images -> one discrete code per patch, the targets of BEiT.

`Tokenizer` is the BEiT v2 design (Peng et al. 2022, microsoft/unilm `beit2/modeling_vqkd.py`): a
ViT encoder, a small "task layer" (Linear-Tanh-Linear) down to a low-dimensional code space, and an
l2-normalised EMA codebook (`VectorQuantizer`). It is trained by `vfm.methods.vq_tokenizer`, either
on pixels (the VQ-VAE route of BEiT v1's dVAE) or on a teacher's features (VQ-KD), and saved as one
self-describing file (`tokenizer.pt`) that `load_tokenizer` rebuilds.

`load_tokenizer` also accepts a pickled image-to-code-logits module, the format of DALL-E's dVAE
encoder (`encoder.pkl` of openai/DALL-E, which BEiT v1 used; unpickling it needs the `dall_e`
package, and, since a pickled module is code, `VFM_TRUST_CHECKPOINTS=1`: files are read by
`vfm.io.load_torch`). DALL-E expects pixels in [0, 1] mapped to [0.1, 0.9] and a grid of H/8 x W/8.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vfm.backbones.timm_backbone import Backbone
from vfm.heads.vector_quantizer import VectorQuantizer
from vfm.io import load_torch

_FORMAT = "vfm-tokenizer-v1"


def task_layer(in_dim: int, out_dim: int) -> nn.Sequential:
    """BEiT v2's encode/decode task layer: Linear -> Tanh -> Linear."""
    return nn.Sequential(nn.Linear(in_dim, in_dim), nn.Tanh(), nn.Linear(in_dim, out_dim))


class Tokenizer(nn.Module):
    """ViT encoder + task layer + vector quantizer: images [B, C, H, W] -> codes [B, N].

    Args:
        backbone: a ViT `Backbone` (its patch grid is the token grid).
        num_codes, code_dim: codebook size and dimension (8192 x 32 in BEiT v2).
        **quantizer: further `VectorQuantizer` keywords (decay, beta, kmeans_init, ...).
    """

    def __init__(self, backbone: Backbone, *, num_codes: int = 8192, code_dim: int = 32, **quantizer: Any) -> None:
        super().__init__()
        if not backbone.has_patch_tokens:
            raise ValueError(f"a tokenizer needs a ViT backbone with patch tokens, got {backbone.name!r}")
        self.backbone = backbone
        self.encode_task_layer = task_layer(backbone.embed_dim, code_dim)
        self.quantizer = VectorQuantizer(num_codes=num_codes, code_dim=code_dim, **quantizer)
        self.num_codes, self.code_dim = num_codes, code_dim
        self.patch_size = backbone.patch_size
        self.quantizer_kwargs = dict(quantizer)

    def quantize(self, images: Tensor) -> tuple[Tensor, Tensor, Tensor, dict[str, Tensor]]:
        """(code vectors [B, N, d] with straight-through gradient, codes [B, N], commitment loss, stats)."""
        return self.quantizer(self._pre_quantize(images))

    @torch.no_grad()
    def forward(self, images: Tensor) -> Tensor:
        """Codes [B, N] (no codebook update, whatever the mode)."""
        return self.quantizer.encode(self._pre_quantize(images))

    def _pre_quantize(self, images: Tensor) -> Tensor:
        return self.encode_task_layer(self.backbone.forward_tokens(images)["patch"])

    def save(self, path: str | Path) -> Path:
        """One file with the architecture and the weights; `load_tokenizer` rebuilds it."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        blob = {
            "format": _FORMAT,
            "backbone": {"name": self.backbone.name, "kwargs": dict(self.backbone.create_kwargs)},
            "num_codes": self.num_codes,
            "code_dim": self.code_dim,
            "quantizer": self.quantizer_kwargs,
            "state_dict": {k: v.detach().cpu() for k, v in self.state_dict().items() if not k.startswith("backbone.mask_token")},
        }
        tmp = path.with_suffix(path.suffix + ".tmp")
        torch.save(blob, tmp)
        tmp.replace(path)
        return path


class PickledCodeModel(nn.Module):
    """A pickled module mapping images to code logits [B, K, h, w] (DALL-E's dVAE encoder format).

    Normalised inputs are mapped back to [0, 1] with `mean`/`std`, then to DALL-E's [0.1, 0.9]
    range, resized so the code grid equals the student's patch grid (`patch_size` px per code at
    the student's resolution, `downsample` px per code for the module).
    """

    def __init__(self, module: nn.Module, *, mean: Sequence[float], std: Sequence[float], patch_size: int,
                 downsample: int = 8, logit_eps: float = 0.1) -> None:
        super().__init__()
        self.module = module
        self.register_buffer("mean", torch.tensor(list(mean)).reshape(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(list(std)).reshape(1, -1, 1, 1), persistent=False)
        self.patch_size, self.downsample, self.logit_eps = patch_size, downsample, logit_eps

    @torch.no_grad()
    def forward(self, images: Tensor) -> Tensor:
        x = (images.float() * self.std + self.mean).clamp(0, 1)
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)  # DALL-E's encoder is RGB
        gh, gw = images.shape[-2] // self.patch_size, images.shape[-1] // self.patch_size
        x = F.interpolate(x, size=(gh * self.downsample, gw * self.downsample), mode="bilinear", antialias=True, align_corners=False)
        x = (1 - 2 * self.logit_eps) * x + self.logit_eps  # DALL-E's map_pixels
        logits = self.module(x)
        return logits.argmax(dim=1).flatten(1)


def load_tokenizer(path: str | Path, *, mean: Sequence[float] | None = None, std: Sequence[float] | None = None,
                   patch_size: int | None = None) -> nn.Module:
    """A frozen tokenizer in eval mode: `tokenizer(images) -> codes [B, N]`, with `.num_codes`.

    `path`: a `tokenizer.pt` written by `pretrain method=vq_tokenizer|vqkd` (or the run directory
    holding it), or a pickled DALL-E-style encoder (`.pkl`; needs `mean`, `std`, `patch_size`).
    """
    path = Path(path)
    if path.is_dir():
        path = path / "tokenizer.pt"
    if not path.is_file():
        raise FileNotFoundError(f"tokenizer {path} does not exist; train one with `pretrain method=vq_tokenizer` "
                                "(or method=vqkd) and pass its run directory or tokenizer.pt")
    if path.suffix == ".pkl":
        module = load_torch(path)
        if mean is None or std is None or patch_size is None:
            raise ValueError("a pickled dVAE tokenizer needs the data's mean/std and the student's patch size")
        num_codes = int(getattr(module, "vocab_size", 8192))
        tok: nn.Module = PickledCodeModel(module, mean=mean, std=std, patch_size=patch_size)
        tok.num_codes = num_codes
    else:
        blob = load_torch(path)
        if not isinstance(blob, dict) or blob.get("format") != _FORMAT:
            raise ValueError(f"{path} is not a tokenizer written by `pretrain method=vq_tokenizer` (format {_FORMAT})")
        backbone = Backbone.from_create_kwargs(blob["backbone"]["name"], blob["backbone"]["kwargs"])
        tok = Tokenizer(backbone, num_codes=blob["num_codes"], code_dim=blob["code_dim"], **blob["quantizer"])
        tok.load_state_dict(blob["state_dict"], strict=True)
    for p in tok.parameters():
        p.requires_grad_(False)
    return tok.eval()
