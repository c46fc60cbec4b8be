"""Patch tokens of a frozen ViT on a grid, with the masks they are scored against, for the dense
evaluators (linear segmentation).

The tokens are the output of the last block after the final norm, without the [CLS] and register
tokens (DINOv2's ``x_norm_patchtokens``, what its linear segmentation head reads), reshaped to the
patch grid. Inputs get the same eval transform as the global features of
:mod:`vfm.evaluators.features` (scaled to [0, 1], normalised with the dataset's mean/std).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from vfm.data.datasets.segmentation import segmentation_batches
from vfm.engine.device import autocast, resolve_precision
from vfm.evaluators.features import _eval_input, _frozen_on
from vfm.viz.pca import patch_tokens

log = logging.getLogger(__name__)

__all__ = ["DenseInputs", "PatchTokens", "encode_patches", "extract_patch_tokens"]


@dataclass
class DenseInputs:
    """What a dense evaluator needs to run an encoder: normalisation, device, precision, batch."""

    mean: Sequence[float]
    std: Sequence[float]
    device: torch.device
    precision: str = "fp32"
    batch_size: int = 256
    progress: bool = False

    def __post_init__(self) -> None:
        self.device = torch.device(self.device)
        if self.device.type == "cuda" and self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        self.precision = resolve_precision(self.precision, self.device)[0]

    def normalise(self, images: Tensor) -> Tensor:
        """uint8 ``[B, C, H, W]`` on any device -> normalised float on ``device``."""
        mean = torch.tensor(list(self.mean), dtype=torch.float32, device=self.device).view(1, -1, 1, 1)
        std = torch.tensor(list(self.std), dtype=torch.float32, device=self.device).view(1, -1, 1, 1)
        return _eval_input(images.to(self.device, non_blocking=True), None, mean, std)


@dataclass
class PatchTokens:
    """A split's patch tokens ``[N, h, w, D]`` (float16, CPU) and masks uint8 ``[N, H, W]``."""

    tokens: Tensor
    masks: Tensor
    images: Tensor  # uint8 [n_show, C, H, W]: the first images, for figures


@torch.no_grad()
def encode_patches(encoder: nn.Module, images: Tensor, inputs: DenseInputs) -> Tensor:
    """Final-norm patch tokens of uint8 ``images [B, C, H, W]`` as ``[B, h, w, D]`` float32 on ``inputs.device``."""
    x = inputs.normalise(images)
    with autocast(inputs.precision, inputs.device):
        tokens, (h, w) = patch_tokens(encoder, x)
    return tokens.float().reshape(x.shape[0], h, w, -1)


@torch.no_grad()
def extract_patch_tokens(encoder: nn.Module, dataset: Dataset, inputs: DenseInputs, *, limit: int | None = None,
                         desc: str = "patch tokens", n_show: int = 8) -> PatchTokens:
    """Encode the first ``limit`` items (all with None) of a ``SegmentationDataset`` with the
    frozen ``encoder``. Tokens are kept in float16 on the CPU: Fashion-MNIST's 54k train images x
    16 patches x 192 dims take 330 MB."""
    tokens: list[Tensor] = []
    masks: list[Tensor] = []
    shown: list[Tensor] = []
    n = len(dataset) if limit is None else min(limit, len(dataset))
    batches = segmentation_batches(dataset, inputs.batch_size, limit=n)
    total = -(-n // inputs.batch_size)
    with _frozen_on(encoder, inputs.device):
        for images, mask in tqdm(batches, total=total, desc=desc, disable=not inputs.progress, leave=False):
            tokens.append(encode_patches(encoder, images, inputs).half().cpu())
            masks.append(mask.to(torch.uint8).cpu())
            if sum(len(s) for s in shown) < n_show:
                shown.append(images[:n_show].cpu())
    if not tokens:
        raise ValueError(f"{desc}: the split is empty")
    return PatchTokens(torch.cat(tokens), torch.cat(masks), torch.cat(shown)[:n_show])
