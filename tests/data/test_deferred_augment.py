"""Deferred collates: the workers stack uint8 images, ``finish`` augments on the batch's device and
must reproduce the plain collate exactly."""

from __future__ import annotations

import functools
import random
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import torch

from vfm.data.collate import _ERASING_SALT, Collate, ImageTextCollate, MultiCropCollate, SupervisedCollate
from vfm.data.erasing import random_erasing
from vfm.data.masking import sample_masks
from vfm.data.transforms import MultiCropAugmentation, normalize

BATCH = 8
SEED = 2**62 + 12345  # batch seeds are 63-bit: this one must survive the deferred batch intact


def _augment(channels: int, size: int, *, n_global: int = 2, n_local: int = 2) -> MultiCropAugmentation:
    return MultiCropAugmentation(global_crop_size=size, local_crop_size=size // 2, n_global=n_global, n_local=n_local,
                                 mean=(0.5,) * channels, std=(0.25,) * channels)


def _images(channels: int, size: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, 256, (BATCH, channels, size, size), dtype=torch.uint8, generator=g)


def _labelled(channels: int, size: int, seed: int = SEED) -> list[tuple]:
    return [(img, i % 4, seed) for i, img in enumerate(_images(channels, size))]


def _tokenizer(captions: list[str]) -> dict[str, torch.Tensor]:
    ids = torch.tensor([[ord(c[0]), len(c)] for c in captions])
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def _captioned(seed: int = SEED) -> list[tuple]:
    return [(img, f"caption {i}", i - 1, seed) for i, img in enumerate(_images(1, 28))]


def _masking() -> Callable:
    return functools.partial(sample_masks, ratio_range=(0.1, 0.5), mask_probability=0.5)


# name -> (collate factory, samples factory)
CASES: dict[str, tuple[Callable[[], Any], Callable[[], list[tuple]]]] = {
    "multicrop": (lambda: MultiCropCollate(_augment(3, 32)), lambda: _labelled(3, 32)),
    "multicrop_masks": (
        lambda: MultiCropCollate(_augment(3, 32), masking=_masking(), patch_size=4),
        lambda: _labelled(3, 32),
    ),
    "multicrop_masks_gray": (
        lambda: MultiCropCollate(_augment(1, 28, n_global=3), masking=_masking(), patch_size=7),
        lambda: _labelled(1, 28),
    ),
    "supervised_mixup_randaugment": (
        lambda: SupervisedCollate(_augment(3, 32, n_global=1, n_local=0), num_classes=4),
        lambda: _labelled(3, 32),
    ),
    "supervised_mixup_randaugment_gray": (
        lambda: SupervisedCollate(_augment(1, 28, n_global=1, n_local=0), num_classes=4, mixup=0.0, cutmix=1.0),
        lambda: _labelled(1, 28),
    ),
    "supervised_mixup_only": (
        lambda: SupervisedCollate(_augment(3, 32, n_global=1, n_local=0), num_classes=4, randaugment=None),
        lambda: _labelled(3, 32),
    ),
    "supervised_no_mixup": (
        lambda: SupervisedCollate(_augment(3, 32, n_global=1, n_local=0), num_classes=4, mixup=0.0, cutmix=0.0),
        lambda: _labelled(3, 32),
    ),
    "image_text": (
        lambda: ImageTextCollate(_augment(1, 28, n_global=1, n_local=0), _tokenizer),
        _captioned,
    ),
}


def _assert_same(a: Any, b: Any, path: str = "batch") -> None:
    """Bitwise equality of nested batches (dicts, lists, tensors incl. dtype, plain values)."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), path
    elif isinstance(a, dict):
        assert isinstance(b, dict) and list(a) == list(b), f"{path}: keys {list(a)} != {list(b)}"
        for k in a:
            _assert_same(a[k], b[k], f"{path}[{k!r}]")
    elif isinstance(a, (list, tuple)):
        assert type(a) is type(b) and len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_same(x, y, f"{path}[{i}]")
    else:
        assert a == b, path


def _nbytes(x: Any) -> int:
    if isinstance(x, torch.Tensor):
        return x.nelement() * x.element_size()
    if isinstance(x, np.ndarray):
        return x.nbytes
    if isinstance(x, dict):
        return sum(_nbytes(v) for v in x.values())
    if isinstance(x, (list, tuple)):
        return sum(_nbytes(v) for v in x)
    return 0


def _tensors(x: Any) -> list[torch.Tensor]:
    if isinstance(x, torch.Tensor):
        return [x]
    if isinstance(x, dict):
        return [t for v in x.values() for t in _tensors(v)]
    if isinstance(x, (list, tuple)):
        return [t for v in x for t in _tensors(v)]
    return []


def _move(x: Any, device: str | torch.device) -> Any:
    """A training loop's batch transfer; like pin_memory and many such helpers, it rebuilds tuples
    as lists, which ``finish`` must tolerate."""
    if isinstance(x, torch.Tensor):
        return x.to(device)
    if isinstance(x, dict):
        return {k: _move(v, device) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_move(v, device) for v in x]
    return x


def _reference(collate: Any, samples: list[tuple]) -> dict[str, Any]:
    """The collates in one pass, as they would be written without deferral: the plain ``__call__`` is
    deferred + finish, so the bitwise test alone could not catch a change that both share
    (e.g. Mixup re-seeded instead of continuing from RandAugment's draws)."""
    from PIL import Image

    seed = samples[0][-1]
    images = torch.stack([s[0] for s in samples])
    labels = torch.tensor([int(s[-2]) for s in samples], dtype=torch.int64)
    if isinstance(collate, ImageTextCollate):
        captions = [s[1] for s in samples]
        crops = collate.augment(images, torch.Generator().manual_seed(seed))
        return {"crops": crops, "text": collate.tokenizer(captions), "captions": captions, "label": labels}
    if isinstance(collate, MultiCropCollate):
        g = torch.Generator().manual_seed(seed)
        out: dict[str, Any] = {"crops": collate.augment(images, g), "label": labels}
        if collate.masking is not None:
            grid = collate.augment.global_crop_size // collate.patch_size
            out["masks"] = [collate.masking(batch_size=len(labels), grid_size=grid, generator=g)
                            for _ in range(collate.augment.n_global)]
        return out
    # DeiT's order (timm create_transform): crop + flip, RandAugment on the crop, normalise, erase; then Mixup
    states = random.getstate(), np.random.get_state()
    random.seed(seed)
    np.random.seed(seed % 2**32)
    try:
        aug = collate.augment
        if collate.randaugment is not None:
            views = aug(images, torch.Generator().manual_seed(seed), normalize=False)[0]
            out_imgs = []
            for img in views.mul(255).round().to(torch.uint8):
                arr = img.permute(1, 2, 0).numpy()
                res = np.asarray(collate.randaugment(Image.fromarray(arr[..., 0] if arr.shape[-1] == 1 else arr)))
                out_imgs.append(torch.from_numpy(res.copy()).reshape(arr.shape).permute(2, 0, 1))
            x = normalize(torch.stack(out_imgs), aug.mean, aug.std)
        else:
            x = aug(images, torch.Generator().manual_seed(seed))[0]
        if collate.erasing > 0:
            x = random_erasing(x, torch.Generator().manual_seed(seed ^ _ERASING_SALT), probability=collate.erasing,
                               mode=collate.erasing_mode, max_count=collate.erasing_count)
        crops = [x]
        if collate.mixup is not None:
            x, target = collate.mixup(crops[0], labels)
            crops = [x]
        else:
            k, eps = collate.num_classes, collate.label_smoothing
            target = torch.full((len(labels), k), eps / k).scatter_(1, labels[:, None], 1.0 - eps + eps / k)
    finally:
        random.setstate(states[0])
        np.random.set_state(states[1])
    return {"crops": crops, "label": labels, "target": target}


@pytest.mark.parametrize("case", list(CASES))
def test_plain_collate_is_unchanged(case: str) -> None:
    make, samples = CASES[case]
    collate = make()
    _assert_same(collate(samples()), _reference(collate, samples()))


@pytest.mark.parametrize("case", list(CASES))
def test_deferred_then_finish_is_bitwise_the_plain_collate(case: str) -> None:
    make, samples = CASES[case]
    collate = make()
    expected = collate(samples())
    deferred = collate.deferred()
    _assert_same(deferred.finish(deferred(samples())), expected)
    # The plain collate finishes a deferred batch too (a trainer may hold either object), and a
    # batch that went through a tuple-to-list transfer still comes out the same.
    _assert_same(collate.finish(_move(deferred(samples()), "cpu")), expected)
    # Sanity: the case is not trivially equal, another seed gives other crops.
    other = deferred.finish(deferred([(*s[:-1], SEED + 1) for s in samples()]))
    assert not torch.equal(other["crops"][0], expected["crops"][0])


@pytest.mark.parametrize("case", list(CASES))
def test_deferred_batch_is_raw_uint8_and_smaller(case: str) -> None:
    make, samples = CASES[case]
    collate = make()
    deferred = collate.deferred()
    assert deferred is not collate and deferred.is_deferred and not collate.is_deferred
    assert deferred.augment is collate.augment  # a shallow copy: nothing heavy is duplicated
    plain, raw = collate(samples()), deferred(samples())
    assert "crops" not in raw and "masks" not in raw and "target" not in raw
    assert raw["images"].dtype == torch.uint8 and raw["images"].shape[0] == BATCH
    assert raw["seed"] == SEED and isinstance(raw["seed"], int)
    # Whatever the workers already did (tokenization, labels) is passed through as is.
    for key in set(plain) - {"crops", "masks", "target"}:
        _assert_same(raw[key], plain[key], key)
    assert _nbytes(raw) < _nbytes(plain), (_nbytes(raw), _nbytes(plain))


def test_supervised_deferred_keeps_randaugment_in_the_workers() -> None:
    make, samples = CASES["supervised_mixup_randaugment"]
    raw = make().deferred()(samples())
    assert not torch.equal(raw["images"], _images(3, 32))  # RandAugmented already
    assert "mix_rng" in raw  # where Mixup continues from, after RandAugment's draws
    raw = CASES["supervised_no_mixup"][0]().deferred()(samples())
    assert "mix_rng" not in raw


@pytest.mark.parametrize("case", list(CASES))
def test_finish_passes_plain_batches_through(case: str) -> None:
    make, samples = CASES[case]
    collate = make()
    plain = collate(samples())
    assert collate.finish(plain) is plain
    assert collate.deferred().finish(plain) is plain


def test_finish_leaves_the_process_random_streams_alone() -> None:
    make, samples = CASES["supervised_mixup_randaugment"]
    deferred = make().deferred()
    raw = deferred(samples())
    random.seed(1)
    np.random.seed(1)
    torch.manual_seed(1)
    states = random.getstate(), np.random.get_state()[1].copy(), torch.get_rng_state()
    deferred.finish(raw)
    assert random.getstate() == states[0]
    assert np.array_equal(np.random.get_state()[1], states[1])
    assert torch.equal(torch.get_rng_state(), states[2])


def test_deferred_batch_validation_stays_in_the_collate() -> None:
    collate = SupervisedCollate(_augment(3, 32, n_global=1, n_local=0), num_classes=4).deferred()
    with pytest.raises(ValueError, match="even"):
        collate(_labelled(3, 32)[:3])
    with pytest.raises(ValueError, match="different seeds"):
        MultiCropCollate(_augment(3, 32)).deferred()(_labelled(3, 32)[:2] + _labelled(3, 32, SEED + 1)[2:])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("case", list(CASES))
def test_finish_on_cuda_draws_the_same_random_parameters(case: str, monkeypatch: pytest.MonkeyPatch) -> None:
    # cuDNN convolutions default to TF32 on Ampere and later, which alone would put the blurred
    # crops ~1e-3 away from the CPU's: compare at full float32 precision.
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    make, samples = CASES[case]
    collate = make()
    expected = collate(samples())
    deferred = collate.deferred()
    out = deferred.finish(_move(deferred(samples()), "cuda"))
    assert list(out) == list(expected)
    assert all(t.device.type == "cuda" for t in _tensors(out))
    for got, want in zip(out["crops"], expected["crops"], strict=True):
        assert got.shape == want.shape
        torch.testing.assert_close(got.cpu(), want, atol=1e-4, rtol=0)
    for got, want in zip(out.get("masks", []), expected.get("masks", []), strict=True):
        assert torch.equal(got.cpu(), want)
    if "target" in expected:
        torch.testing.assert_close(out["target"].cpu(), expected["target"], atol=1e-6, rtol=0)
    assert torch.equal(out["label"].cpu(), expected["label"])


def test_every_training_collate_is_a_collate_that_can_defer() -> None:
    for make, _ in CASES.values():
        collate = make()
        assert isinstance(collate, Collate) and collate.deferred().is_deferred


def test_a_collate_that_cannot_defer_says_which_option_to_turn_off() -> None:
    class Plain(Collate):
        can_defer = False

        def __call__(self, samples):
            return {"crops": [torch.stack([s[0] for s in samples]).float()]}

    plain = Plain()
    assert plain.finish({"crops": []}) == {"crops": []}  # a batch that is not deferred passes through
    with pytest.raises(ValueError, match=r"trainer\.augment_on_device=true: the collate Plain cannot defer .*"
                                         r"set trainer\.augment_on_device=false"):
        plain.deferred()
