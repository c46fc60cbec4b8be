"""A frozen feature teacher: the targets of EVA (masked feature prediction) and of VQ-KD (BEiT v2's
tokenizer).

Both papers regress the per-patch output of a CLIP image tower *after* its final LayerNorm
(`ln_post`) and its projection (`@ proj`): EVA-01 OpenAI CLIP-L/14 (baaivision/EVA
`EVA-01/eva/clip/model.py`, `VisionTransformer.forward`: `ln_post(x[:, 1:]) @ proj`), EVA-02 EVA-CLIP
(`EVA-02/asuka/eva_clip/vit_model.py`: `head(norm(x)[:, 1:])`), VQ-KD OpenAI CLIP-B/16 (microsoft/unilm
`beit2/modeling_vqkd.py`, `get_regress_target`: `encode_image(..., return_all_tokens=True) @ proj`).
And both feed the teacher images normalised with CLIP's own mean and std, whatever the student sees
(EVA `datasets.py` `DataAugmentationForEVA.visual_token_transform`; VQ-KD `ScalingLayerForClip`).

`Teacher` wraps the loaded encoder with those two pieces:
- `projection`: the teacher's projection onto the shared image-text space when its weight file has
  one (timm's `head` of a CLIP model, this project's CLIP `image_projection`), else None: the
  targets are then the final-norm patch tokens;
- `normalize="clip"`: undo the dataset's normalisation and apply CLIP's (for a real CLIP teacher);
  `"dataset"`: feed the teacher the student's images as they are (a teacher trained here, on the
  dataset's normalisation).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from vfm.backbones.loading import load_pretrained_encoder_and_projection

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
NORMALIZE_OPTIONS = ("clip", "dataset")


def renormalize(images: Tensor, src_mean: Tensor, src_std: Tensor, dst_mean: Tensor, dst_std: Tensor) -> Tensor:
    """images [B, C, H, W] normalised with (src_mean, src_std) -> normalised with (dst_mean, dst_std);
    the statistics are [1, C, 1, 1]. Exact affine map: ((x * s_src + m_src) - m_dst) / s_dst."""
    return (images * src_std + src_mean - dst_mean) / dst_std


class Teacher(nn.Module):
    """A frozen encoder -> per-patch targets [B, N, D] (`out_dim` = D).

    Args:
        path: weights (see `vfm.backbones.loading.load_pretrained_encoder`).
        model_name: timm model name for a foreign weight file.
        normalize: "clip" (renormalise the input to CLIP's mean/std) or "dataset" (as given).
        data_mean, data_std: the dataset normalisation of the images the method receives (needed
            for "clip").
        model_kwargs: further timm keywords for a foreign weight file.
    """

    def __init__(self, path: str | Path, *, model_name: str | None = None, normalize: str = "clip",
                 data_mean: Sequence[float] | None = None, data_std: Sequence[float] | None = None,
                 model_kwargs: dict[str, Any] | None = None) -> None:
        super().__init__()
        if normalize not in NORMALIZE_OPTIONS:
            raise ValueError(f"method.teacher_normalize must be 'clip' or 'dataset', got {normalize!r}")
        encoder, projection = load_pretrained_encoder_and_projection(path, model_name=model_name,
                                                                     model_kwargs=model_kwargs)
        if not getattr(encoder, "has_patch_tokens", False):
            raise ValueError(f"teacher {path} ({encoder.name}) has no patch tokens; a feature teacher must be a ViT")
        self.encoder, self.projection, self.normalize = encoder, projection, normalize
        self.patch_size = encoder.patch_size
        self.out_dim = int(projection.out_features) if projection is not None else int(encoder.embed_dim)
        if normalize == "clip":
            if data_mean is None or data_std is None:
                raise ValueError("method.teacher_normalize=clip needs the dataset's mean and std (method.data_mean/std)")
            if len(data_mean) != 3 or len(data_std) != 3:
                raise ValueError(f"method.teacher_normalize=clip needs RGB images (CLIP's mean/std are per RGB "
                                 f"channel), the data has {len(data_mean)} channel(s): set method.teacher_normalize=dataset")
            for name, value in (("data_mean", data_mean), ("data_std", data_std), ("clip_mean", CLIP_MEAN), ("clip_std", CLIP_STD)):
                self.register_buffer(name, torch.tensor(list(value), dtype=torch.float32).view(1, -1, 1, 1), persistent=False)
        for p in self.parameters():
            p.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> Teacher:
        return super().train(False)  # always frozen: no dropout / drop path, whatever the method's mode

    def prepare(self, images: Tensor) -> Tensor:
        """The teacher's input: `images` renormalised to CLIP's statistics ("clip") or as given."""
        if self.normalize == "dataset":
            return images
        return renormalize(images.float(), self.data_mean, self.data_std, self.clip_mean, self.clip_std).to(images.dtype)

    @torch.no_grad()
    def forward(self, images: Tensor) -> Tensor:
        """images [B, C, H, W] (dataset-normalised) -> targets [B, N, out_dim]."""
        tokens = self.encoder.forward_tokens(self.prepare(images))["patch"]
        return self.projection(tokens) if self.projection is not None else tokens
