"""I-JEPA's multi-block sampler and collate (vfm.data.multiblock) on hand-checkable grids."""

from __future__ import annotations

import pytest
import torch

from vfm.data.multiblock import (
    MultiBlockCollate,
    MultiBlockMaskGenerator,
    _truncate_and_stack,
)
from vfm.data.transforms import MultiCropAugmentation

OFFICIAL = MultiBlockMaskGenerator()  # configs/in1k_vith14_ep300.yaml


def _draw(gen: MultiBlockMaskGenerator, seed: int, batch: int = 16, grid: int = 14):
    return gen(batch_size=batch, grid_size=grid, generator=torch.Generator().manual_seed(seed))


def test_block_size_by_hand():
    # 16x16 grid (ViT-H/14 at 224): scale and aspect come from the same draw u
    # u=0: area int(256 * 0.15) = 38, aspect 0.75 -> h = round(sqrt(28.5)) = 5, w = round(sqrt(50.67)) = 7
    assert OFFICIAL.block_size(0.0, (0.15, 0.2), (0.75, 1.5), (16, 16)) == (5, 7)
    # u=1: area int(51.2) = 51, aspect 1.5 -> h = round(8.75) = 9, w = round(5.83) = 6
    assert OFFICIAL.block_size(1.0, (0.15, 0.2), (0.75, 1.5), (16, 16)) == (9, 6)
    # context u=0.5: area int(236.8) = 236 -> 15 x 15; u=1: 16 x 16 clipped to the grid side minus one
    assert OFFICIAL.block_size(0.5, (0.85, 1.0), (1.0, 1.0), (16, 16)) == (15, 15)
    assert OFFICIAL.block_size(1.0, (0.85, 1.0), (1.0, 1.0), (16, 16)) == (15, 15)


def _rectangle(ids: torch.Tensor, grid: int) -> tuple[int, int]:
    """(h, w) of the full rectangle the indices cover; fails if they are not one."""
    rows, cols = ids // grid, ids % grid
    h, w = int(rows.max() - rows.min() + 1), int(cols.max() - cols.min() + 1)
    assert h * w == len(ids), "not a full rectangle"
    return h, w


@pytest.mark.parametrize("seed", range(5))
def test_target_blocks_have_the_scale_and_aspect_of_the_config(seed):
    masks = _draw(OFFICIAL, seed)
    assert masks.context.shape[:2] == (1, 16) and masks.targets.shape[:2] == (4, 16)
    allowed = {OFFICIAL.block_size(i / 1000, (0.15, 0.2), (0.75, 1.5), (14, 14)) for i in range(1000)}
    sizes = {_rectangle(ids, 14) for block in masks.targets for ids in block}
    assert len(sizes) == 1 and sizes <= allowed  # one size per batch, one the config can draw
    (h, w), = sizes
    # int(196 * [0.15, 0.2]) = 29..39 patches before rounding h and w; aspect 0.75-1.5 up to rounding
    assert 25 <= h * w <= 42 and 0.6 <= h / w <= 1.8


def test_context_excludes_the_targets_and_keeps_more_than_min_keep():
    for seed in range(5):
        masks = _draw(OFFICIAL, seed)
        assert masks.context.shape[-1] > OFFICIAL.min_keep
        for b in range(16):
            ctx = set(masks.context[0, b].tolist())
            assert not ctx & set(masks.targets[:, b].flatten().tolist())
            assert masks.context[0, b].tolist() == sorted(ctx)  # row-major, ascending


def test_context_relaxes_the_last_targets_first():
    gen = MultiBlockMaskGenerator(min_keep=3)
    left, right = torch.zeros(6, 6, dtype=torch.bool), torch.zeros(6, 6, dtype=torch.bool)
    left[:, :3], right[:, 3:] = True, True
    ctx = gen._context_block((5, 5), [left, right], (6, 6), torch.Generator().manual_seed(0))
    # both targets cover the whole grid: after 20 empty draws the last target stops constraining
    assert not (ctx & left).any() and (ctx & right).any() and int(ctx.sum()) > 3
    overlap = MultiBlockMaskGenerator(min_keep=3, allow_overlap=True)
    full = overlap._context_block((5, 5), [left, right], (6, 6), torch.Generator().manual_seed(0))
    assert int(full.sum()) == 25


def test_truncation_keeps_the_first_patches_of_every_block():
    per_image = [[torch.tensor([1, 4, 9]), torch.tensor([2, 3])], [torch.tensor([0, 5]), torch.tensor([6, 7, 8])]]
    out = _truncate_and_stack(per_image, 2)
    assert out.tolist() == [[[1, 4], [0, 5]], [[2, 3], [6, 7]]]  # [block, image, K = 2]


def test_deterministic_per_seed():
    a, b, c = _draw(OFFICIAL, 3), _draw(OFFICIAL, 3), _draw(OFFICIAL, 4)
    assert torch.equal(a.context, b.context) and torch.equal(a.targets, b.targets)
    assert not (a.context.shape == c.context.shape and torch.equal(a.context, c.context))


def test_official_corners_never_reach_the_last_row_or_column():
    def touched(gen: MultiBlockMaskGenerator) -> set[int]:
        rows = set()
        for seed in range(10):
            m = _draw(gen, seed, batch=8, grid=8)
            ids = torch.cat([m.context.flatten(), m.targets.flatten()])
            rows |= set((ids // 8).tolist()) | set((ids % 8).tolist())
        return rows

    small = dict(min_keep=2)
    assert 7 not in touched(MultiBlockMaskGenerator(**small))
    assert 7 in touched(MultiBlockMaskGenerator(**small, full_grid_positions=True))


def test_blocks_that_can_never_exceed_min_keep_are_a_clear_error():
    # 7x7 grid: a target block has 6-12 patches, never more than the official min_keep 10 at its smallest
    with pytest.raises(ValueError, match=r"target block can have 6 patches.*method\.masking\.min_keep"):
        OFFICIAL.check(7)
    with pytest.raises(ValueError, match=r"method\.masking\.min_keep"):  # never an endless loop
        _draw(OFFICIAL, 0, batch=2, grid=7)
    MultiBlockMaskGenerator(min_keep=5).check(7)
    with pytest.raises(ValueError, match="target_scale"):
        MultiBlockMaskGenerator(target_scale=(0.3, 0.2))


def _collate() -> MultiBlockCollate:
    aug = MultiCropAugmentation(global_crop_size=28, local_crop_size=28, n_global=1, n_local=0, global_scale=(0.3, 1.0),
                                mean=[0.5], std=[0.25], flip_p=0.0, color_jitter_p=0.0, grayscale_p=0.0,
                                blur_p=(0.0, 0.0, 0.0), solarize_p=(0.0, 0.0, 0.0))
    return MultiBlockCollate(aug, MultiBlockMaskGenerator(min_keep=3, target_scale=(0.1, 0.15)), patch_size=4)


def test_collate_attaches_the_masks_and_defers_like_the_plain_collate():
    g = torch.Generator().manual_seed(0)
    samples = [(torch.randint(0, 256, (1, 28, 28), dtype=torch.uint8, generator=g), i, 11) for i in range(6)]
    collate = _collate()
    batch = collate(samples)
    assert set(batch) == {"crops", "label", "context_ids", "target_ids"}
    assert batch["crops"][0].shape == (6, 1, 28, 28)
    assert batch["context_ids"].shape[:2] == (1, 6) and batch["target_ids"].shape[:2] == (4, 6)
    assert int(batch["context_ids"].max()) < 49 and batch["context_ids"].dtype == torch.int64
    finished = collate.finish(collate.deferred()(samples))
    for key in ("context_ids", "target_ids"):
        assert torch.equal(finished[key], batch[key])
    assert torch.equal(finished["crops"][0], batch["crops"][0])


def test_collate_needs_one_view():
    aug = MultiCropAugmentation(global_crop_size=28, local_crop_size=14, n_global=2, n_local=0, mean=[0.5], std=[0.25])
    with pytest.raises(ValueError, match="n_global=1"):
        MultiBlockCollate(aug, MultiBlockMaskGenerator(min_keep=3), patch_size=4)
