"""I-JEPA's multi-block masks: one large context block and several small target blocks per image,
drawn in the collate.

Assran et al., "Self-Supervised Learning from Images with a Joint-Embedding Predictive
Architecture", CVPR 2023; official code facebookresearch/ijepa, `src/masks/multiblock.py`
(`MaskCollator`), run with `configs/in1k_vith14_ep300.yaml` (`mask:`).

Per batch, one target block size and one context block size are drawn; per image, `n_targets`
target blocks and `n_contexts` context blocks of those sizes are placed at random positions. A block
of scale s and aspect ratio r covers int(H * W * s) patches as h = round(sqrt(int(H W s) r)) rows and
w = round(sqrt(int(H W s) / r)) columns, each at most the grid side minus one. The patches of
every target block are removed from the context block (`allow_overlap=False`); when that leaves
`min_keep` patches or fewer 20 times in a row, one more target block (the last ones first) is
allowed to overlap the context, as in the official loop. Since the context then differs in size from
image to image, every context (and every target) keeps only its first K patches in row-major order,
K the smallest count in the batch, so the blocks batch without padding.

What follows the official sampler literally, because it shapes the published runs:
- scale and aspect ratio come from one uniform draw (`_sample_block_size` reuses `_rand`): large
  target blocks are also the tall ones;
- the aspect ratio is drawn uniformly in [r_lo, r_hi], not log-uniformly;
- a block's top-left corner is drawn with an exclusive upper bound (`torch.randint(0, H - h)`), so
  no block touches the last patch row or column; `full_grid_positions=True` lets it.

Deliberate difference: every draw (sizes and positions) comes from the batch's `generator`, so
masks are a pure function of the batch seed (the official draws the sizes from a seeded generator
and the positions from the global torch generator).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import Tensor

from vfm.data.batch import Batch
from vfm.data.collate import MultiCropCollate
from vfm.data.masking import _as_grid
from vfm.data.transforms import MultiCropAugmentation

__all__ = ["MultiBlockCollate", "MultiBlockMaskGenerator", "MultiBlockMasks"]

# the official sampler relaxes the context's constraints after this many blocks of min_keep or fewer
_ATTEMPTS_PER_RELAXATION = 20
# the masks draw from their own generator (batch seed XOR this), so the crops keep their stream
_MASK_SALT = 0x1_E9A_B10C


class MultiBlockMasks(NamedTuple):
    """Patch indices (row-major, ascending within each block) of one batch.

    context: int64 [n_contexts, B, K_ctx], the patches the context encoder sees.
    targets: int64 [n_targets, B, K_tgt], the patches whose target representations are predicted.
    """

    context: Tensor
    targets: Tensor


def _check_range(name: str, lo_hi: Sequence[float], lo: float, hi: float | None) -> tuple[float, float]:
    if len(lo_hi) != 2 or not lo <= lo_hi[0] <= lo_hi[1] or (hi is not None and lo_hi[1] > hi):
        bound = f"{lo} <= lo <= hi" + (f" <= {hi}" if hi is not None else "")
        raise ValueError(f"{name} must be a pair [lo, hi] with {bound}, got {list(lo_hi)}")
    return float(lo_hi[0]), float(lo_hi[1])


class MultiBlockMaskGenerator:
    """I-JEPA's multi-block sampler (the official `MaskCollator` without the image collation).

    Args:
        n_targets: target blocks per image (4; `num_pred_masks`).
        target_scale: share of the grid a target block covers (0.15-0.2; `pred_mask_scale`).
        target_aspect: height / width of a target block (0.75-1.5; `aspect_ratio`).
        n_contexts: context blocks per image (1; `num_enc_masks`).
        context_scale: share of the grid the context block covers (0.85-1.0; `enc_mask_scale`).
        context_aspect: height / width of the context block (1.0: square, hard-coded officially).
        min_keep: a block must keep more than this many patches (10).
        allow_overlap: keep the target patches in the context (False).
        full_grid_positions: draw block corners so that blocks can touch the last row and column
            (False, as the official code; see the module docstring).

    Call it with `(batch_size=, grid_size=, generator=)` for a `MultiBlockMasks`.
    """

    def __init__(
        self,
        *,
        n_targets: int = 4,
        target_scale: Sequence[float] = (0.15, 0.2),
        target_aspect: Sequence[float] = (0.75, 1.5),
        n_contexts: int = 1,
        context_scale: Sequence[float] = (0.85, 1.0),
        context_aspect: Sequence[float] = (1.0, 1.0),
        min_keep: int = 10,
        allow_overlap: bool = False,
        full_grid_positions: bool = False,
    ) -> None:
        if n_targets < 1 or n_contexts < 1:
            raise ValueError(f"n_targets and n_contexts must be >= 1, got {n_targets} and {n_contexts}")
        if min_keep < 0:
            raise ValueError(f"min_keep must be >= 0, got {min_keep}")
        self.n_targets, self.n_contexts, self.min_keep = n_targets, n_contexts, min_keep
        self.target_scale = _check_range("target_scale", target_scale, 0.0, 1.0)
        self.context_scale = _check_range("context_scale", context_scale, 0.0, 1.0)
        self.target_aspect = _check_range("target_aspect", target_aspect, 1e-6, None)
        self.context_aspect = _check_range("context_aspect", context_aspect, 1e-6, None)
        self.allow_overlap, self.full_grid_positions = allow_overlap, full_grid_positions

    def __repr__(self) -> str:
        return (f"MultiBlockMaskGenerator(targets={self.n_targets} x scale {self.target_scale} aspect {self.target_aspect}, "
                f"contexts={self.n_contexts} x scale {self.context_scale} aspect {self.context_aspect}, "
                f"min_keep={self.min_keep}, allow_overlap={self.allow_overlap})")

    @staticmethod
    def block_size(u: float, scale: tuple[float, float], aspect: tuple[float, float], grid: tuple[int, int]) -> tuple[int, int]:
        """(h, w) of a block for the uniform draw `u` in [0, 1): scale and aspect both from `u`."""
        height, width = grid
        area = int(height * width * (scale[0] + u * (scale[1] - scale[0])))
        ratio = aspect[0] + u * (aspect[1] - aspect[0])
        h = int(round(math.sqrt(area * ratio)))
        w = int(round(math.sqrt(area / ratio)))
        return min(h, height - 1), min(w, width - 1)

    def check(self, grid_size: int | tuple[int, int]) -> None:
        """Raise ValueError if some block this sampler can draw on `grid_size` never has more than
        `min_keep` patches (the official loop would then never end)."""
        grid = _as_grid(grid_size)
        for name, scale, aspect in (("target", self.target_scale, self.target_aspect),
                                    ("context", self.context_scale, self.context_aspect)):
            smallest = min(h * w for h, w in (self.block_size(i / 100, scale, aspect, grid) for i in range(101)))
            if smallest <= self.min_keep:
                raise ValueError(
                    f"on the {grid[0]}x{grid[1]} patch grid a {name} block can have {smallest} patches, not more than "
                    f"min_keep={self.min_keep}; lower method.masking.min_keep (e.g. {max(0, smallest - 1)}) or raise "
                    f"method.masking.{name}_scale"
                )

    def _place(self, h: int, w: int, grid: tuple[int, int], generator: torch.Generator) -> Tensor:
        """A bool [H, W] mask of one h x w block at a random position."""
        extra = 1 if self.full_grid_positions else 0
        top = int(torch.randint(0, grid[0] - h + extra, (1,), generator=generator))
        left = int(torch.randint(0, grid[1] - w + extra, (1,), generator=generator))
        mask = torch.zeros(grid, dtype=torch.bool)
        mask[top : top + h, left : left + w] = True
        return mask

    def _context_block(self, size: tuple[int, int], targets: list[Tensor], grid: tuple[int, int],
                       generator: torch.Generator) -> Tensor:
        """A context block minus the target blocks; after every 20 draws that keep min_keep
        patches or fewer, the last remaining target block stops constraining it (official)."""
        relaxed, attempts = 0, _ATTEMPTS_PER_RELAXATION
        while True:
            mask = self._place(*size, grid, generator)
            if not self.allow_overlap:
                for target in targets[: max(len(targets) - relaxed, 0)]:
                    mask &= ~target
            if int(mask.sum()) > self.min_keep:
                return mask
            attempts -= 1
            if attempts == 0:
                relaxed, attempts = relaxed + 1, _ATTEMPTS_PER_RELAXATION

    def __call__(self, *, batch_size: int, grid_size: int | tuple[int, int], generator: torch.Generator) -> MultiBlockMasks:
        grid = _as_grid(grid_size)
        # one size per batch, targets first (the official order of draws)
        t_size = self.block_size(torch.rand(1, generator=generator).item(), self.target_scale, self.target_aspect, grid)
        c_size = self.block_size(torch.rand(1, generator=generator).item(), self.context_scale, self.context_aspect, grid)
        if min(t_size[0] * t_size[1], c_size[0] * c_size[1]) <= self.min_keep:
            self.check(grid)  # names the keys to change; the official loop would never end here
            raise ValueError(f"a {t_size} target or {c_size} context block keeps min_keep={self.min_keep} patches or "
                             "fewer; lower method.masking.min_keep")
        contexts: list[list[Tensor]] = []
        targets: list[list[Tensor]] = []
        for _ in range(batch_size):
            blocks = [self._place(*t_size, grid, generator) for _ in range(self.n_targets)]
            ctx = [self._context_block(c_size, blocks, grid, generator) for _ in range(self.n_contexts)]
            targets.append([b.flatten().nonzero().squeeze(1) for b in blocks])
            contexts.append([c.flatten().nonzero().squeeze(1) for c in ctx])
        return MultiBlockMasks(_truncate_and_stack(contexts, self.n_contexts),
                               _truncate_and_stack(targets, self.n_targets))


def _truncate_and_stack(per_image: list[list[Tensor]], n: int) -> Tensor:
    """[n, B, K] from B lists of n index vectors: each keeps its first K entries, K the shortest."""
    if not per_image:
        return torch.zeros(n, 0, 0, dtype=torch.int64)
    keep = min(len(ids) for blocks in per_image for ids in blocks)
    return torch.stack([torch.stack([blocks[j][:keep] for blocks in per_image]) for j in range(n)])


class MultiBlockCollate(MultiCropCollate):
    """Collate for I-JEPA: one view per image (`augment`, e.g. a random resized crop, drawn as
    :class:`~vfm.data.collate.MultiCropCollate` draws it) and its multi-block masks, drawn from a
    generator seeded by the batch seed XOR a constant (so the crops keep their own stream).

    Returns ``{"crops": [float [B, C, s, s]], "label": int64 [B], "context_ids": int64
    [n_contexts, B, K_ctx], "target_ids": int64 [n_targets, B, K_tgt]}`` (patch indices on the
    grid of the view, ``s // patch_size`` a side). ``deferred()`` works as for ``MultiCropCollate``:
    the masks are drawn on the CPU in ``finish`` and moved to the batch's device.
    """

    def __init__(self, augment: MultiCropAugmentation, masking: MultiBlockMaskGenerator, patch_size: int) -> None:
        if augment.n_global != 1 or augment.n_local != 0:
            raise ValueError(f"I-JEPA trains on one view per image: set method.augment.n_global=1 and n_local=0, "
                             f"got {augment.n_global} and {augment.n_local}")
        super().__init__(augment, masking=None, patch_size=patch_size)
        self.blocks = masking
        masking.check(augment.global_crop_size // patch_size)

    def _finish(self, batch: Batch, images: Tensor, seed: int) -> Batch:
        out = super()._finish(batch, images, seed)
        grid = self.augment.global_crop_size // self.patch_size
        generator = torch.Generator().manual_seed(seed ^ _MASK_SALT)
        masks = self.blocks(batch_size=len(out["label"]), grid_size=grid, generator=generator)
        out["context_ids"] = masks.context.to(images.device)
        out["target_ids"] = masks.targets.to(images.device)
        return out
