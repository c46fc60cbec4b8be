"""Batched multi-crop augmentation: shapes, determinism, and each op against its definition."""

from __future__ import annotations

import pytest
import torch
import torchvision.transforms as TT
import torchvision.transforms.functional as TF

from vfm.data import photometric as P
from vfm.data.crops import sample_crop_boxes
from vfm.data.transforms import MultiCropAugmentation, normalize

# Everything off: the pipeline reduces to RandomResizedCrop (+ flip) and normalisation.
PLAIN = dict(
    color_jitter_p=0.0,
    grayscale_p=0.0,
    blur_p=(0.0, 0.0, 0.0),
    solarize_p=(0.0, 0.0, 0.0),
    mean=(0.0,),
    std=(1.0,),
    n_local=0,
    global_scale=(1.0, 1.0),
)




def images(b: int = 4, c: int = 1, size: int = 28, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (b, c, size, size), generator=torch.Generator().manual_seed(seed), dtype=torch.uint8)


def test_shapes_dtypes_counts() -> None:
    aug = MultiCropAugmentation(global_crop_size=28, local_crop_size=12, n_local=6, mean=(0.3,), std=(0.3,))
    crops = aug(images(), torch.Generator().manual_seed(0))
    assert len(crops) == 8
    assert all(c.shape == (4, 1, 28, 28) for c in crops[:2])
    assert all(c.shape == (4, 1, 12, 12) for c in crops[2:])
    assert all(c.dtype == torch.float32 and torch.isfinite(c).all() for c in crops)
    rgb = MultiCropAugmentation(
        global_crop_size=24, local_crop_size=8, n_global=3, n_local=2, mean=(0.5, 0.5, 0.5), std=(0.2, 0.2, 0.2)
    )
    crops = rgb(images(c=3, size=32))
    assert [tuple(c.shape) for c in crops] == [(4, 3, 24, 24)] * 3 + [(4, 3, 8, 8)] * 2


def test_same_seed_identical_other_seed_different() -> None:
    aug = MultiCropAugmentation(global_crop_size=24, local_crop_size=10, mean=(0.5,) * 3, std=(0.25,) * 3)
    x = images(b=6, c=3, size=32)
    a = aug(x, torch.Generator().manual_seed(7))
    b = aug(x, torch.Generator().manual_seed(7))
    c = aug(x, torch.Generator().manual_seed(8))
    assert all(torch.equal(u, v) for u, v in zip(a, b, strict=True))
    assert all(not torch.equal(u, w) for u, w in zip(a, c, strict=True))
    # Per-sample parameters: one sample's crop does not depend on the rest of the batch's content.
    d = aug(torch.cat([x[:1], images(b=5, c=3, size=32, seed=9)]), torch.Generator().manual_seed(7))
    assert torch.equal(a[0][0], d[0][0])


def test_rows_of_a_batch_match_the_whole_batch() -> None:
    """`of_batch` / `start` (one process's slice of a data-parallel global batch): every op on, the
    slice comes out bitwise as those rows of the whole batch."""
    aug = MultiCropAugmentation(global_crop_size=24, local_crop_size=10, mean=(0.5,) * 3, std=(0.25,) * 3)
    x = images(b=8, c=3, size=32)
    whole = aug(x, torch.Generator().manual_seed(7))
    for start, stop in ((0, 4), (4, 8), (3, 5)):
        part = aug(x[start:stop], torch.Generator().manual_seed(7), of_batch=8, start=start)
        assert all(torch.equal(w[start:stop], q) for w, q in zip(whole, part, strict=True)), (start, stop)
    with pytest.raises(ValueError, match="do not fit in a batch of 8"):
        aug(x[:4], torch.Generator().manual_seed(7), of_batch=8, start=6)


def test_identity_crop_and_flip() -> None:
    x = images(c=3, size=20)
    unit = x.float() / 255
    same = MultiCropAugmentation(global_crop_size=20, local_crop_size=8, flip_p=0.0, **PLAIN)(x)
    torch.testing.assert_close(same[0], unit, atol=1e-5, rtol=0)
    flipped = MultiCropAugmentation(global_crop_size=20, local_crop_size=8, flip_p=1.0, **PLAIN)(x)
    for crop in flipped:
        torch.testing.assert_close(crop, torch.flip(unit, dims=[-1]), atol=1e-5, rtol=0)


def test_crop_boxes_follow_torchvision_random_resized_crop() -> None:
    g = torch.Generator().manual_seed(0)
    n, height, width, scale = 4000, 40, 30, (0.08, 1.0)
    top, left, h, w = sample_crop_boxes(torch.rand(n, 4, 10, generator=g), height, width, scale)
    assert (top >= 0).all() and (left >= 0).all() and (top + h <= height).all() and (left + w <= width).all()
    assert torch.equal(h, h.round()) and torch.equal(top, top.round())
    torch.manual_seed(0)
    ref = torch.tensor(
        [TT.RandomResizedCrop.get_params(torch.empty(1, height, width), list(scale), [3 / 4, 4 / 3]) for _ in range(n)],
        dtype=torch.float32,
    )
    ours = torch.stack([top, left, h, w], dim=1)
    assert torch.allclose(ours.mean(0), ref.mean(0), rtol=0.06)
    assert torch.allclose(ours.std(0), ref.std(0), rtol=0.08)
    # No box fits an extreme aspect ratio at this scale: torchvision's centre-crop fallback.
    top, left, h, w = sample_crop_boxes(torch.rand(5, 4, 10, generator=g), 10, 100, (0.9, 1.0))
    assert top.tolist() == [0] * 5 and left.tolist() == [43] * 5 and h.tolist() == [10] * 5 and w.tolist() == [13] * 5


@pytest.mark.parametrize(
    ("ours", "reference", "factors"),
    [
        (P.adjust_brightness, TF.adjust_brightness, [0.6, 1.0, 1.4]),
        (P.adjust_contrast, TF.adjust_contrast, [0.6, 1.0, 1.4]),
        (P.adjust_saturation, TF.adjust_saturation, [0.8, 1.0, 1.2]),
        (P.adjust_hue, TF.adjust_hue, [-0.1, 0.03, 0.1]),
    ],
    ids=["brightness", "contrast", "saturation", "hue"],
)
def test_color_ops_match_torchvision_definitions(ours, reference, factors) -> None:
    x = torch.rand(3, 3, 9, 9, generator=torch.Generator().manual_seed(1))
    got = ours(x.clone(), torch.tensor(factors))
    want = torch.stack([reference(x[i], f) for i, f in enumerate(factors)])
    torch.testing.assert_close(got, want, atol=2e-6, rtol=0)


def test_grayscale_images_supported() -> None:
    """1-channel: brightness/contrast apply, saturation/hue/grayscale are no-ops (no crash)."""
    aug = MultiCropAugmentation(
        global_crop_size=16, local_crop_size=8, color_jitter_p=1.0, grayscale_p=1.0, mean=(0.5,), std=(0.5,)
    )
    crops = aug(images(size=16))
    assert all(c.shape[1] == 1 for c in crops)
    rgb_gray = MultiCropAugmentation(global_crop_size=16, local_crop_size=8, **{**PLAIN, "grayscale_p": 1.0})(
        images(c=3, size=16)
    )
    assert torch.allclose(rgb_gray[0][:, 0], rgb_gray[0][:, 1]) and torch.allclose(rgb_gray[0][:, 1], rgb_gray[0][:, 2])


def test_solarize() -> None:
    x = torch.tensor([0.0, 0.25, 0.49, 0.5, 0.75, 1.0])
    assert torch.allclose(P.solarize(x), torch.tensor([0.0, 0.25, 0.49, 0.5, 0.25, 0.0]))
    imgs = images(size=12)
    plain = {**PLAIN, "solarize_p": (1.0, 1.0, 1.0)}
    out = MultiCropAugmentation(global_crop_size=12, local_crop_size=4, flip_p=0.0, **plain)(imgs)[0]
    unit = imgs.float() / 255
    torch.testing.assert_close(out, torch.where(unit >= 0.5, 1 - unit, unit), atol=1e-5, rtol=0)


def test_blur() -> None:
    # A constant image stays constant (the kernel sums to one, reflect padding adds no border).
    const = torch.full((3, 2, 10, 10), 0.3)
    torch.testing.assert_close(P.gaussian_blur(const, torch.tensor([0.5, 1.0, 2.0])), const)
    # Per-sample sigmas equal torchvision's (exact) gaussian_blur with the same kernel radius.
    x = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    sigma = torch.tensor([0.7, 1.3])  # radius ceil(3 * 1.3) = 4 -> kernel 9
    want = torch.stack([TF.gaussian_blur(x[i], [9, 9], [float(s)] * 2) for i, s in enumerate(sigma)])
    torch.testing.assert_close(P.gaussian_blur(x, sigma), want, atol=1e-5, rtol=0)
    # Through the pipeline: always-on blur keeps a constant image's mean.
    flat = torch.full((2, 1, 24, 24), 77, dtype=torch.uint8)
    out = MultiCropAugmentation(global_crop_size=24, local_crop_size=8, **{**PLAIN, "blur_p": (1.0, 1.0, 1.0)})(flat)
    torch.testing.assert_close(out[0], torch.full_like(out[0], 77 / 255), atol=1e-5, rtol=0)


def test_blur_sigma_scales_with_resolution() -> None:
    assert MultiCropAugmentation(global_crop_size=224, local_crop_size=96, mean=(0.5,), std=(0.5,)).sigma_scale == 1.0
    assert MultiCropAugmentation(global_crop_size=28, local_crop_size=12, mean=(0.5,), std=(0.5,)).sigma_scale == 0.125


def test_normalize_and_stats() -> None:
    x = images(b=64, c=3, size=8, seed=3)
    unit = x.float() / 255
    mean = unit.mean(dim=(0, 2, 3)).tolist()
    std = unit.std(dim=(0, 2, 3)).tolist()
    out = normalize(x, mean, std)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out.mean(dim=(0, 2, 3)), torch.zeros(3), atol=1e-4, rtol=0)
    torch.testing.assert_close(out.std(dim=(0, 2, 3)), torch.ones(3), atol=1e-4, rtol=0)
    # The augmentation normalises the same way.
    aug = MultiCropAugmentation(
        global_crop_size=8, local_crop_size=4, flip_p=0.0, **{**PLAIN, "mean": mean, "std": std}
    )
    torch.testing.assert_close(aug(x)[0], out, atol=1e-5, rtol=0)
    # Centre crop for splits stored larger than the model's input.
    assert normalize(x, (0.5,), (0.5,), crop_size=6).shape == (64, 3, 6, 6)
    with pytest.raises(ValueError, match="channels"):
        normalize(x, (0.5, 0.5), (0.5, 0.5))
    with pytest.raises(ValueError, match="uint8"):
        normalize(unit, mean, std)


@pytest.mark.parametrize(
    "bad",
    [
        {"flip_p": 1.5},
        {"color_jitter_p": -0.1},
        {"blur_p": (1.0, 0.1)},
        {"solarize_p": (0.0, 2.0, 0.0)},
        {"global_scale": (0.5, 0.4)},
        {"local_scale": (0.0, 0.4)},
        {"mean": (0.5, 0.5)},
        {"std": (0.0,)},
        {"hue": 0.7},
        {"blur_sigma": (0.0, 2.0)},
        {"n_global": 0},
        {"local_crop_size": 0},
    ],
)
def test_invalid_arguments(bad: dict) -> None:
    kwargs = {"global_crop_size": 28, "local_crop_size": 12, "mean": (0.5,), "std": (0.5,), **bad}
    with pytest.raises(ValueError):
        MultiCropAugmentation(**kwargs)


def test_rejects_wrong_input() -> None:
    aug = MultiCropAugmentation(global_crop_size=8, local_crop_size=4, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
    with pytest.raises(ValueError, match="uint8"):
        aug(torch.rand(2, 3, 8, 8))
    with pytest.raises(ValueError, match="channels"):
        aug(images(c=1, size=8))
