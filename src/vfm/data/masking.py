"""Patch masking for masked image modelling: blockwise (BEiT, iBOT, DINOv2, EVA) and per-sample
uniform random (MAE).

Bao et al., "BEiT: BERT Pre-Training of Image Transformers", ICLR 2022; official code:
microsoft/unilm, `beit/masking_generator.py` (`MaskingGenerator`).
Zhou et al., "iBOT: Image BERT Pre-Training with Online Tokenizer", ICLR 2022; official code:
bytedance/ibot, `loader.py` (`ImageFolderMask`, the same block loop inlined).
Oquab et al., "DINOv2: Learning Robust Visual Features without Supervision", TMLR 2024; official
code: facebookresearch/dinov2, `dinov2/data/masking.py` and `dinov2/data/collate.py`
(`collate_data_and_cast`).

A mask over an H x W patch grid is built from rectangles: each round draws a block with area
A ~ U(min_area, max_area) and aspect ratio r = exp(U(log r_min, log r_max)), i.e. height
h = round(sqrt(A r)), width w = round(sqrt(A / r)), at a uniformly random position, and keeps it
if it masks at least one new patch and no more than the patches still wanted. Up to 10 attempts
per round; rounds repeat until the target count is reached.

The smallest block area differs between the codebases: 16 in BEiT's and EVA-01's pretraining
commands (`--min_mask_patches_per_block 16`), 4 in DINOv2 and BEiT's `MaskingGenerator` default,
and (min(H, W) // 3)^2 in iBOT (`loader.py`, `low = (min(H, W) // 3) ** 2`: 16 on a 14 x 14 grid,
1 on a 4 x 4 one), selected here with `min_num_patches=None`.

Masks are pure functions of a `torch.Generator`, so the data pipeline's per-batch seed (see
`vfm.data.sampler`) makes them reproducible and independent of worker count.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["BlockMaskGenerator", "random_masks", "sample_masks"]

# BEiT/iBOT/DINOv2 give up on a round after this many rejected blocks.
_ATTEMPTS_PER_ROUND = 10


def _as_grid(grid_size: int | tuple[int, int]) -> tuple[int, int]:
    if isinstance(grid_size, int):
        grid = (grid_size, grid_size)
    else:
        grid = tuple(grid_size)  # type: ignore[assignment]
    if len(grid) != 2 or not all(isinstance(g, int) and not isinstance(g, bool) for g in grid):
        raise ValueError(f"grid_size must be an int or a pair of ints, got {grid_size!r}")
    if grid[0] < 1 or grid[1] < 1:
        raise ValueError(f"grid_size must be positive, got {grid_size!r}")
    return grid  # type: ignore[return-value]


class BlockMaskGenerator:
    """Rectangular blocks of random area and log-uniform aspect ratio, added until the target count is reached (BEiT/iBOT).

    Args:
        grid_size: patch grid H x W (an int for a square grid), e.g. 14 for 224 px images and 16 px patches.
        min_num_patches: smallest block area drawn (4 in DINOv2, 16 in BEiT's and EVA-01's runs); None
            means iBOT's (min(H, W) // 3)^2 (at least 1). With `exact`, clipped to the largest block that
            fits the grid and to the number of patches still wanted, so tiny grids (2 x 2, 4 x 4) work.
        max_num_patches: largest block area drawn; None means "as many as are still wanted" (BEiT's
            default ties it to the target count; DINOv2 passes 0.5 * H * W).
        min_aspect: smallest aspect ratio h / w (0.3 in BEiT/iBOT/DINOv2).
        max_aspect: largest aspect ratio; None means 1 / min_aspect (symmetric in log space).
        exact: reach the target count exactly (below). False runs the official loop unchanged: the area
            is drawn from U(min_num_patches, still wanted) even when that range is reversed, and the
            mask stops at the first round of 10 rejected blocks, short of the target.

    Calling it with `(num_masking_patches, generator)` returns a bool mask [H, W] with exactly
    `num_masking_patches` True entries (any count in [0, H * W] is achievable) when `exact`.

    Deviation from the official loop when `exact` (the default), for exactness and termination: BEiT
    stops as soon as a round of 10 attempts adds nothing, which can leave the mask short of the target
    (on a 14 x 14 grid with blocks of >= 16 patches a third of BEiT's 75-patch masks end short, at
    74.5 patches on average; badly on tiny grids where a drawn block rarely fits). Here (a) the lower
    end of the area draw is clipped to the patches still wanted and to what fits (BEiT's
    `random.uniform(4, 2)` silently swaps its bounds instead), and (b) if a round still makes no
    progress, the remaining patches are added one at a time, each chosen uniformly among the unmasked
    patches that touch the mask (4-neighbourhood), or among all unmasked patches when none touches it.
    This keeps the masked region compact and the count exact, and the loop is bounded by H * W steps.

    As in the official code a block must be strictly smaller than the grid in both directions
    (`h < H and w < W`); on a 1 x W or H x 1 grid no block fits and the fallback does all the work.
    """

    def __init__(
        self,
        grid_size: int | tuple[int, int],
        *,
        min_num_patches: int | None = 4,
        max_num_patches: int | None = None,
        min_aspect: float = 0.3,
        max_aspect: float | None = None,
        exact: bool = True,
    ) -> None:
        self.height, self.width = _as_grid(grid_size)
        self.num_patches = self.height * self.width
        if min_num_patches is None:  # iBOT: a third of the shorter side, squared
            min_num_patches = max(1, (min(self.height, self.width) // 3) ** 2)
        if min_num_patches < 1:
            raise ValueError(f"min_num_patches must be >= 1, got {min_num_patches}")
        if max_num_patches is not None and max_num_patches < min_num_patches:
            raise ValueError(f"max_num_patches ({max_num_patches}) must be >= min_num_patches ({min_num_patches})")
        if not min_aspect > 0:
            raise ValueError(f"min_aspect must be > 0, got {min_aspect}")
        if max_aspect is not None and max_aspect < min_aspect:
            raise ValueError(f"max_aspect ({max_aspect}) must be >= min_aspect ({min_aspect})")
        self.min_num_patches = min_num_patches
        self.max_num_patches = max_num_patches
        self.exact = exact
        max_aspect = 1.0 / min_aspect if max_aspect is None else max_aspect
        # With min_aspect > 1 and no max_aspect the default 1 / min_aspect is the lower end: sort.
        lo, hi = sorted((math.log(min_aspect), math.log(max_aspect)))
        self.log_aspect_ratio = (lo, hi)
        # The largest block the strict `h < H and w < W` test admits; min area above it would never fit.
        self._max_fit_area = max(1, (self.height - 1) * (self.width - 1))

    def __repr__(self) -> str:
        return (
            f"BlockMaskGenerator(grid=({self.height}, {self.width}), min_num_patches={self.min_num_patches}, "
            f"max_num_patches={self.max_num_patches}, aspect=({math.exp(self.log_aspect_ratio[0]):.3f}, "
            f"{math.exp(self.log_aspect_ratio[1]):.3f}), exact={self.exact})"
        )

    def _add_block(self, mask: Tensor, max_mask_patches: int, generator: torch.Generator) -> int:
        """One BEiT round: up to 10 random blocks; paint the first that adds 1..max_mask_patches new patches."""
        lo_area = self.min_num_patches  # official: U(lo, hi) with lo > hi draws from [hi, lo]
        if self.exact:
            lo_area = min(lo_area, self._max_fit_area, max_mask_patches)
        log_lo, log_hi = self.log_aspect_ratio
        for _ in range(_ATTEMPTS_PER_ROUND):
            u = torch.rand(4, generator=generator, dtype=torch.float64).tolist()
            target_area = lo_area + (max_mask_patches - lo_area) * u[0]
            aspect = math.exp(log_lo + (log_hi - log_lo) * u[1])
            h = int(round(math.sqrt(target_area * aspect)))
            w = int(round(math.sqrt(target_area / aspect)))
            if not (0 < h < self.height and 0 < w < self.width):
                continue
            # Uniform over the (H - h + 1) x (W - w + 1) top-left positions (BEiT's randint is inclusive).
            top = min(int(u[2] * (self.height - h + 1)), self.height - h)
            left = min(int(u[3] * (self.width - w + 1)), self.width - w)
            block = mask[top : top + h, left : left + w]
            new = h * w - int(block.sum())
            if 0 < new <= max_mask_patches:
                block.fill_(True)
                return new
        return 0

    def _fill_remaining(self, mask: Tensor, remaining: int, generator: torch.Generator) -> None:
        """Add `remaining` single patches, preferring unmasked neighbours of the mask (keeps it compact)."""
        for _ in range(remaining):
            grown = mask.clone()  # mask dilated by its 4-neighbourhood
            grown[1:] |= mask[:-1]
            grown[:-1] |= mask[1:]
            grown[:, 1:] |= mask[:, :-1]
            grown[:, :-1] |= mask[:, 1:]
            candidates = (grown & ~mask).flatten().nonzero().flatten()
            if candidates.numel() == 0:
                candidates = (~mask).flatten().nonzero().flatten()
            pick = candidates[torch.randint(candidates.numel(), (1,), generator=generator)]
            mask.view(-1)[pick] = True

    def __call__(self, num_masking_patches: int, generator: torch.Generator) -> Tensor:
        """Returns a bool mask [H, W] with exactly `num_masking_patches` True entries."""
        if not 0 <= num_masking_patches <= self.num_patches:
            raise ValueError(
                f"num_masking_patches must be in [0, {self.num_patches}] for a {self.height}x{self.width} grid, "
                f"got {num_masking_patches}"
            )
        mask = torch.zeros(self.height, self.width, dtype=torch.bool)
        count = 0
        while count < num_masking_patches:
            remaining = num_masking_patches - count
            max_mask_patches = remaining if self.max_num_patches is None else min(remaining, self.max_num_patches)
            delta = self._add_block(mask, max_mask_patches, generator)
            if delta == 0:  # the official loops stop here, short of the target
                if self.exact:
                    self._fill_remaining(mask, remaining, generator)
                break
            count += delta
        return mask


def sample_masks(
    batch_size: int,
    grid_size: int | tuple[int, int],
    *,
    ratio_range: tuple[float, float] = (0.1, 0.5),
    mask_probability: float = 0.5,
    generator: torch.Generator,
    min_num_patches: int | None = 4,
    stratified: bool = True,
    exact: bool = True,
) -> Tensor:
    """Blockwise masks for a batch: each sample is masked or not, with a ratio drawn in `ratio_range`.

    Two ways to draw which samples are masked and with which ratio, with the same marginals (a sample
    is masked with probability p, its ratio uniform in [r_lo, r_hi]):

    - `stratified=True`, DINOv2's `collate_data_and_cast` (facebookresearch/dinov2,
      `dinov2/data/collate.py`): the first n = round(B * p) samples get a mask, the other B - n none.
      [r_lo, r_hi] is cut into n equal bins (linspace with n + 1 edges); sample i draws its ratio
      uniformly within bin i. The sample order is then shuffled with `generator`, so which images
      are masked is random. This fixes the number of masked samples per batch and spreads their
      ratios evenly (less batch-to-batch variance of the number of masked tokens). round() is
      half-up (DINOv2 truncates with int(), which loses a sample when B * p is an odd half-integer
      or lands a float ulp below an integer); DINOv2's max_num_patches = 0.5 * H * W is left unset,
      it never binds for ratios <= 0.5.
    - `stratified=False`, iBOT's `ImageFolderMask.get_pred_ratio` (bytedance/ibot `loader.py`, run
      with `--pred_ratio 0 0.3 --pred_ratio_var 0 0.2`): every sample independently picks ratio 0
      or U(0.1, 0.5) with equal odds, i.e. is masked with probability p = 0.5 at a ratio
      ~ U(r_lo, r_hi), so about half of the crops of a batch are unmasked.

    A masked sample hides int(H * W * ratio) patches, placed by a `BlockMaskGenerator`.

    Args:
        batch_size: B (one mask per image; the collate calls it once per global crop).
        grid_size: patch grid H x W (or an int for a square grid).
        ratio_range: (r_lo, r_hi) with 0 <= r_lo <= r_hi <= 1 ((0.1, 0.5) in iBOT/DINOv2).
        mask_probability: share of the samples that are masked (0.5 in iBOT/DINOv2, 1 in BEiT/EVA).
        generator: the only source of randomness.
        min_num_patches: smallest block area, None for iBOT's (min(H, W) // 3)^2 (see `BlockMaskGenerator`).
        stratified: DINOv2's stratified draw (True) or iBOT's independent per-sample draw (False).
        exact: masks hold exactly int(H * W * ratio) patches (see `BlockMaskGenerator`).

    Returns:
        bool [B, H * W], True where the student sees a mask token.
    """
    height, width = _as_grid(grid_size)
    if batch_size < 0:
        raise ValueError(f"batch_size must be >= 0, got {batch_size}")
    if len(ratio_range) != 2 or not 0.0 <= ratio_range[0] <= ratio_range[1] <= 1.0:
        raise ValueError(f"ratio_range must satisfy 0 <= lo <= hi <= 1, got {ratio_range!r}")
    if not 0.0 <= mask_probability <= 1.0:
        raise ValueError(f"mask_probability must be in [0, 1], got {mask_probability}")
    mask_gen = BlockMaskGenerator((height, width), min_num_patches=min_num_patches, exact=exact)
    n_patches = height * width
    lo, hi = ratio_range
    masks = torch.zeros(batch_size, n_patches, dtype=torch.bool)
    if not stratified:
        for i in range(batch_size):
            u = torch.rand(2, generator=generator, dtype=torch.float64).tolist()
            if u[0] < mask_probability:
                masks[i] = mask_gen(min(n_patches, int(n_patches * (lo + (hi - lo) * u[1]))), generator).flatten()
        return masks
    n_masked = min(batch_size, math.floor(batch_size * mask_probability + 0.5))
    edges = torch.linspace(lo, hi, n_masked + 1, dtype=torch.float64).tolist()
    for i in range(n_masked):
        u = torch.rand((), generator=generator, dtype=torch.float64).item()
        ratio = edges[i] + (edges[i + 1] - edges[i]) * u
        masks[i] = mask_gen(min(n_patches, int(n_patches * ratio)), generator).flatten()
    return masks[torch.randperm(batch_size, generator=generator)]


def random_masks(
    batch_size: int,
    grid_size: int | tuple[int, int],
    *,
    ratio: float = 0.75,
    generator: torch.Generator,
) -> Tensor:
    """MAE's per-sample random masking (He et al. 2022, facebookresearch/mae `models_mae.py`,
    `random_masking`): each image draws uniform noise per patch, keeps the
    `int(N * (1 - ratio))` patches with the smallest noise and masks the rest, independently of
    the other images. Every image therefore has the same number of masked patches, which lets the
    encoder batch the visible tokens without padding.

    Returns bool [B, H * W], True where the patch is masked (hidden from the encoder).
    """
    height, width = _as_grid(grid_size)
    if not 0.0 <= ratio < 1.0:
        raise ValueError(f"mask ratio must be in [0, 1) (at least one patch stays visible), got {ratio}")
    n = height * width
    n_keep = max(1, int(n * (1.0 - ratio)))
    noise = torch.rand(batch_size, n, generator=generator)
    ids_shuffle = torch.argsort(noise, dim=1)
    masks = torch.ones(batch_size, n, dtype=torch.bool)
    masks.scatter_(1, ids_shuffle[:, :n_keep], False)
    return masks
