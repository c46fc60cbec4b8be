from collections import deque

import pytest
import torch

from vfm.data.masking import BlockMaskGenerator, random_masks, sample_masks


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _components(mask: torch.Tensor) -> list[list[tuple[int, int]]]:
    """4-connected components of a bool [H, W] mask."""
    h, w = mask.shape
    seen, comps = set(), []
    for i in range(h):
        for j in range(w):
            if not mask[i, j] or (i, j) in seen:
                continue
            comp, todo = [], deque([(i, j)])
            seen.add((i, j))
            while todo:
                a, b = todo.popleft()
                comp.append((a, b))
                for da, db in ((1, 0), (-1, 0), (0, 1), (0, -1)):
                    na, nb = a + da, b + db
                    if 0 <= na < h and 0 <= nb < w and mask[na, nb] and (na, nb) not in seen:
                        seen.add((na, nb))
                        todo.append((na, nb))
            comps.append(comp)
    return comps


@pytest.mark.parametrize("grid", [14, (4, 6), 4, 2, 1, (1, 5)])
def test_exact_count_for_every_achievable_target(grid):
    mask_gen = BlockMaskGenerator(grid)
    n_patches = mask_gen.num_patches
    for seed in range(2):
        g = _gen(seed)
        for n in range(n_patches + 1):
            mask = mask_gen(n, g)
            assert mask.dtype == torch.bool and mask.shape == (mask_gen.height, mask_gen.width)
            assert int(mask.sum()) == n


@pytest.mark.parametrize(("area", "aspect", "shape"), [(9, 1.0, (3, 3)), (6, 1.5, (3, 2)), (8, 0.5, (2, 4))])
def test_single_block_draw_is_one_filled_rectangle(area, aspect, shape):
    # Fixed aspect and area == target: the first block is the whole mask (h = round(sqrt(A r)), w = round(sqrt(A / r))).
    mask_gen = BlockMaskGenerator(10, min_num_patches=area, min_aspect=aspect, max_aspect=aspect)
    positions = set()
    for seed in range(10):
        mask = mask_gen(area, _gen(seed))
        (comp,) = _components(mask)
        rows, cols = [p[0] for p in comp], [p[1] for p in comp]
        top, left = min(rows), min(cols)
        bbox = mask[top : max(rows) + 1, left : max(cols) + 1]
        assert bbox.all() and tuple(bbox.shape) == shape
        positions.add((top, left))
    assert len(positions) > 1  # placed at random positions


def test_blocks_are_blocky_not_scattered():
    # A 30 % mask on a 14 x 14 grid comes from a handful of rectangles, not from ~59 isolated patches.
    g = _gen(0)
    mask_gen = BlockMaskGenerator(14)
    n_comps = [len(_components(mask_gen(59, g))) for _ in range(20)]
    assert max(n_comps) <= 12


def test_deterministic_for_a_seed_and_different_for_another():
    mask_gen = BlockMaskGenerator(14)
    assert torch.equal(mask_gen(60, _gen(1)), mask_gen(60, _gen(1)))
    assert not torch.equal(mask_gen(60, _gen(1)), mask_gen(60, _gen(2)))
    a = sample_masks(16, 14, generator=_gen(3))
    assert torch.equal(a, sample_masks(16, 14, generator=_gen(3)))
    assert not torch.equal(a, sample_masks(16, 14, generator=_gen(4)))


def test_global_rng_is_neither_used_nor_advanced():
    state = torch.get_rng_state()
    torch.manual_seed(123)
    a = sample_masks(8, 14, generator=_gen(0))
    torch.manual_seed(456)
    b = sample_masks(8, 14, generator=_gen(0))
    assert torch.equal(a, b)
    torch.manual_seed(7)
    before = torch.get_rng_state()
    BlockMaskGenerator(4)(5, _gen(0))
    assert torch.equal(before, torch.get_rng_state())
    torch.set_rng_state(state)


@pytest.mark.parametrize("grid", [4, 2])
@pytest.mark.parametrize("min_num_patches", [1, 4, 100])
def test_tiny_grids_terminate(grid, min_num_patches):
    # 28 px images with 7 px patches give a 4 x 4 grid; BEiT's min block area 4 barely fits (or not at all on 2 x 2).
    mask_gen = BlockMaskGenerator(grid, min_num_patches=min_num_patches)
    g = _gen(0)
    for n in range(grid * grid + 1):
        for _ in range(3):
            assert int(mask_gen(n, g).sum()) == n
    masks = sample_masks(32, grid, generator=g, min_num_patches=min_num_patches)
    assert masks.shape == (32, grid * grid)


def test_sample_masks_fraction_and_stratified_ratios():
    batch, grid, (lo, hi) = 64, 14, (0.1, 0.5)
    n_patches = grid * grid
    masks = sample_masks(batch, grid, ratio_range=(lo, hi), mask_probability=0.5, generator=_gen(0))
    assert masks.dtype == torch.bool and masks.shape == (batch, n_patches)
    counts = masks.sum(dim=1)
    masked = counts[counts > 0].sort().values
    assert masked.numel() == 32  # exactly round(B * p) samples are masked
    # Sample i's ratio lies in bin i of linspace(lo, hi, 33): sorted counts fall in their bins.
    edges = torch.linspace(lo, hi, masked.numel() + 1, dtype=torch.float64)
    for i, c in enumerate(masked.tolist()):
        assert int(n_patches * edges[i]) <= c <= int(n_patches * edges[i + 1])
    assert int(n_patches * lo) <= masked.min() and masked.max() <= int(n_patches * hi)


def test_sample_masks_shuffles_which_samples_are_masked():
    first_masked = {tuple(sample_masks(8, 14, generator=_gen(s)).any(dim=1).tolist()) for s in range(6)}
    assert len(first_masked) > 1
    assert all(sum(row) == 4 for row in first_masked)


@pytest.mark.parametrize(
    ("batch", "prob", "expected"), [(3, 0.5, 2), (10, 0.3, 3), (5, 0.0, 0), (5, 1.0, 5), (0, 0.5, 0)]
)
def test_sample_masks_number_of_masked_samples(batch, prob, expected):
    masks = sample_masks(batch, (4, 6), ratio_range=(0.2, 0.5), mask_probability=prob, generator=_gen(0))
    assert masks.shape == (batch, 24)
    assert int(masks.any(dim=1).sum()) == expected


def test_bad_arguments():
    g = _gen(0)
    for kwargs in (
        {"grid_size": 0},
        {"grid_size": (3,)},
        {"grid_size": (3, 2.5)},
        {"grid_size": 4, "min_num_patches": 0},
        {"grid_size": 4, "min_num_patches": 5, "max_num_patches": 4},
        {"grid_size": 4, "min_aspect": 0.0},
        {"grid_size": 4, "min_aspect": 0.5, "max_aspect": 0.4},
    ):
        with pytest.raises(ValueError):
            BlockMaskGenerator(**kwargs)
    mask_gen = BlockMaskGenerator(4)
    for n in (-1, 17):
        with pytest.raises(ValueError, match="num_masking_patches"):
            mask_gen(n, g)
    for kwargs in (
        {"batch_size": -1},
        {"ratio_range": (0.5, 0.1)},
        {"ratio_range": (-0.1, 0.5)},
        {"ratio_range": (0.1, 1.5)},
        {"mask_probability": 1.5},
        {"mask_probability": -0.1},
    ):
        args = {"batch_size": 4, "grid_size": 4, "generator": g} | kwargs
        with pytest.raises(ValueError):
            sample_masks(**args)


# ------------------------------------------------------------------ MAE's per-sample random masks


@pytest.mark.parametrize("grid,ratio,masked", [(4, 0.75, 12), (7, 0.75, 37), (14, 0.75, 147), (7, 0.4, 20)])
def test_random_masks_mask_exactly_n_minus_int_keep(grid, ratio, masked):
    # MAE keeps len_keep = int(N * (1 - ratio)) patches per image: 196 -> 49 kept, 49 -> 12 kept
    m = random_masks(16, grid, ratio=ratio, generator=torch.Generator().manual_seed(0))
    assert m.shape == (16, grid * grid) and m.dtype == torch.bool
    assert (m.sum(dim=1) == masked).all()


def test_random_masks_are_independent_per_sample_and_uniform():
    m = random_masks(4000, 4, ratio=0.75, generator=torch.Generator().manual_seed(0))
    assert len({tuple(r.tolist()) for r in m[:100]}) > 90  # rows differ
    freq = m.float().mean(dim=0)  # every position masked with probability 12/16
    assert torch.allclose(freq, torch.full_like(freq, 0.75), atol=0.03)
    # independence: P(i and j masked) = 12/16 * 11/15 for i != j (sampling without replacement per image)
    joint = (m[:, 0] & m[:, 5]).float().mean().item()
    assert abs(joint - 0.75 * 11 / 15) < 0.03


def test_random_masks_are_a_function_of_the_generator():
    a = random_masks(8, 7, generator=torch.Generator().manual_seed(3))
    b = random_masks(8, 7, generator=torch.Generator().manual_seed(3))
    c = random_masks(8, 7, generator=torch.Generator().manual_seed(4))
    assert torch.equal(a, b) and not torch.equal(a, c)
    with pytest.raises(ValueError, match="mask ratio"):
        random_masks(2, 4, ratio=1.0, generator=torch.Generator())
