"""Corrupt inputs in the lazily decoded folder datasets: ``bad_files="fail"`` names the file,
``bad_files="skip"`` replaces it by the next item and counts it, across DataLoader workers too."""

from __future__ import annotations

import io
import logging
import re
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image, ImageFile
from torch.utils.data import DataLoader

from vfm.data import datasets as D
from vfm.data.datasets import ImageDecodeError, ImageFileDataset, imagefolder, load_image, unlabeled_folder

CONF_DIR = Path(__file__).resolve().parents[2] / "conf" / "dataset"
S = 8  # image side: small, so every test decodes in milliseconds


def _image_bytes(seed: int, fmt: str) -> bytes:
    array = np.random.default_rng(seed).integers(0, 256, (S, S, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format=fmt)
    return buf.getvalue()


def write_good(path: Path, seed: int) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(_image_bytes(seed, "JPEG" if path.suffix == ".jpg" else "PNG"))
    return path


def truncated_jpeg(path: Path) -> Path:
    data = _image_bytes(100, "JPEG")
    path.write_bytes(data[: len(data) // 2])
    return path


def truncated_png(path: Path) -> Path:
    data = _image_bytes(101, "PNG")
    path.write_bytes(data[: len(data) // 2])
    return path


def zero_bytes(path: Path) -> Path:
    path.write_bytes(b"")
    return path


def text_as_jpg(path: Path) -> Path:
    path.write_text("this is a text file, not a JPEG\n")
    return path


BAD_KINDS: dict[str, tuple[str, Callable[[Path], Path]]] = {
    "truncated_jpeg": ("jpg", truncated_jpeg),
    "truncated_png": ("png", truncated_png),
    "zero_bytes": ("jpg", zero_bytes),
    "text_as_jpg": ("jpg", text_as_jpg),
}


def make_bad(directory: Path, kind: str, name: str = "bad") -> Path:
    ext, writer = BAD_KINDS[kind]
    directory.mkdir(parents=True, exist_ok=True)
    return writer(directory / f"{name}.{ext}")


def decode(path: Path) -> torch.Tensor:
    return load_image(path, resize=S, crop=S, in_chans=3)


def dataset(paths: list[Path], bad_files: str = "skip") -> ImageFileDataset:
    return ImageFileDataset([(str(p), k) for k, p in enumerate(paths)], resize=S, crop=S, in_chans=3,
                            bad_files=bad_files)


# ------------------------------------------------------------------------------ load_image


def test_pil_truncated_images_flag_is_off() -> None:
    # Importing vfm must not make PIL pad truncated files with grey instead of raising.
    import vfm.data.image_text  # noqa: F401

    assert ImageFile.LOAD_TRUNCATED_IMAGES is False


@pytest.mark.parametrize("kind", sorted(BAD_KINDS))
def test_load_image_raises_naming_the_file(tmp_path: Path, kind: str) -> None:
    bad = make_bad(tmp_path, kind)
    with pytest.raises(ImageDecodeError, match=re.escape(str(bad))):
        decode(bad)


def test_jpeg_missing_only_its_tail_still_raises(tmp_path: Path) -> None:
    # The header parses and the error only appears while decoding the pixels (PIL decodes lazily).
    data = _image_bytes(7, "JPEG")
    (tmp_path / "tail.jpg").write_bytes(data[:-12])
    with Image.open(tmp_path / "tail.jpg") as img:
        assert img.size == (S, S)
    with pytest.raises(ImageDecodeError, match="truncated"):
        decode(tmp_path / "tail.jpg")


@pytest.mark.parametrize("error", [ValueError, SyntaxError, EOFError])
def test_pil_value_and_syntax_errors_are_decode_errors(tmp_path: Path, monkeypatch, error: type) -> None:
    good = write_good(tmp_path / "a.png", 0)

    def broken_load(self):  # what some PIL plugins raise on broken files
        raise error("broken data")

    monkeypatch.setattr(ImageFile.ImageFile, "load", broken_load)
    with pytest.raises(ImageDecodeError, match=rf"a\.png: {error.__name__}: broken data"):
        decode(good)


def test_unrelated_errors_are_not_skipped(tmp_path: Path, monkeypatch) -> None:
    paths = [write_good(tmp_path / f"{k}.png", k) for k in range(3)]
    ds = dataset(paths, "skip")

    def buggy_load(self):
        raise KeyError("a bug, not a bad file")

    monkeypatch.setattr(ImageFile.ImageFile, "load", buggy_load)
    with pytest.raises(KeyError, match="a bug"):
        ds[0]
    assert ds.num_skipped == 0


# ------------------------------------------------------------------------------ (a) fail


@pytest.mark.parametrize("kind", sorted(BAD_KINDS))
def test_fail_policy_raises_naming_the_file(tmp_path: Path, kind: str) -> None:
    good = write_good(tmp_path / "a.png", 0)
    bad = make_bad(tmp_path, kind)
    ds = dataset([good, bad], "fail")
    assert torch.equal(ds[0][0], decode(good))
    with pytest.raises(OSError, match=re.escape(str(bad)) + r".*dataset\.bad_files=skip") as info:
        ds[1]
    assert isinstance(info.value, ImageDecodeError)
    assert ds.num_skipped == 0


# ------------------------------------------------------------------------------ (b) skip


@pytest.mark.parametrize("kind", sorted(BAD_KINDS))
def test_skip_policy_returns_the_next_image_and_counts(tmp_path: Path, kind: str, caplog) -> None:
    paths = [write_good(tmp_path / "0.png", 0), make_bad(tmp_path, kind), write_good(tmp_path / "2.jpg", 2)]
    ds = dataset(paths)
    assert ds.bad_files == "skip" and ds.num_skipped == 0
    image, label = ds[0]
    assert torch.equal(image, decode(paths[0])) and label == 0 and ds.num_skipped == 0
    with caplog.at_level(logging.WARNING, logger="vfm.data"):
        image, label = ds[1]
    assert torch.equal(image, decode(paths[2])) and label == 2  # the replacement's image and label
    assert ds.num_skipped == 1
    assert str(paths[1]) in caplog.text and "using item 2 instead" in caplog.text
    ds[1]  # every failed read is a skip event
    assert ds.num_skipped == 2


def test_skip_wraps_around_and_over_consecutive_bad_files(tmp_path: Path) -> None:
    paths = [write_good(tmp_path / "0.png", 0), write_good(tmp_path / "1.png", 1),
             make_bad(tmp_path, "zero_bytes", "b2"), make_bad(tmp_path, "text_as_jpg", "b3")]
    ds = dataset(paths)
    image, label = ds[2]  # 2 and 3 are bad: 0 (wrapping around) replaces it
    assert torch.equal(image, decode(paths[0])) and label == 0 and ds.num_skipped == 2
    image, label = ds[-1]
    assert torch.equal(image, decode(paths[0])) and label == 0 and ds.num_skipped == 3
    with pytest.raises(IndexError):
        ds[4]


def test_skip_log_is_throttled_to_powers_of_two(tmp_path: Path, caplog) -> None:
    paths = [make_bad(tmp_path, "zero_bytes", "bad"), write_good(tmp_path / "1.png", 1)]
    ds = dataset(paths)
    with caplog.at_level(logging.WARNING, logger="vfm.data"):
        for _ in range(40):
            ds[0]
    assert ds.num_skipped == 40
    counts = [int(m) for m in re.findall(r"(\d+) undecodable image\(s\) skipped so far", caplog.text)]
    assert counts == [1, 2, 3, 4, 5, 8, 16, 32]


# ------------------------------------------------------------------------------ (c) DataLoader workers


def _mixed_folder(tmp_path: Path) -> tuple[list[Path], list[int]]:
    """12 files, one bad file of each kind, never two bad files in a row; and which index each item reads."""
    kinds = dict(zip((1, 4, 7, 11), sorted(BAD_KINDS)))
    paths = [make_bad(tmp_path, kinds[k], f"{k:02d}") if k in kinds else write_good(tmp_path / f"{k:02d}.png", k)
             for k in range(12)]
    source = [(k + 1) % 12 if k in kinds else k for k in range(12)]
    return paths, source


@pytest.mark.parametrize("context", ["fork", "spawn"])
def test_skips_are_counted_across_dataloader_workers(tmp_path: Path, context: str) -> None:
    paths, source = _mixed_folder(tmp_path)
    ds = dataset(paths)
    loader = DataLoader(ds, batch_size=4, num_workers=2, multiprocessing_context=context)
    images, labels = [], []
    for x, y in loader:
        assert x.shape == (4, 3, S, S)  # full batches: the bad items were replaced, not dropped
        images.append(x)
        labels.append(y)
    assert ds.num_skipped == 4  # counted in the workers, read in the main process
    assert torch.cat(labels).tolist() == source
    assert torch.equal(torch.cat(images), torch.stack([decode(paths[j]) for j in source]))
    ds[1]  # the main process counts into the same total
    assert ds.num_skipped == 5


# ------------------------------------------------------------------------------ (d) builders


def test_imagefolder_fail_end_to_end(tmp_path: Path) -> None:
    for c in ("cat", "dog"):
        for k in range(3):
            write_good(tmp_path / "train" / c / f"{k}.png", k)
    bad = make_bad(tmp_path / "train" / "dog", "truncated_jpeg", "broken")
    write_good(tmp_path / "val" / "cat" / "0.png", 5)
    bad_test = make_bad(tmp_path / "val" / "dog", "text_as_jpg", "notes")
    splits = imagefolder(root=str(tmp_path), load_size=S, img_size=S, val_fraction=0.25, bad_files="fail")
    assert splits.num_classes == 2 and splits.class_names == ["cat", "dog"]
    assert {splits.train.bad_files, splits.val.bad_files, splits.test.bad_files} == {"fail"}
    split, idx = next((s, k) for s in (splits.train, splits.val) for k, (p, _) in enumerate(s.samples) if p == str(bad))
    with pytest.raises(ImageDecodeError, match=re.escape(str(bad)) + r".*dataset\.bad_files=skip"):
        split[idx]
    test_idx = [p for p, _ in splits.test.samples].index(str(bad_test))
    with pytest.raises(ImageDecodeError, match=re.escape(str(bad_test))):
        splits.test[test_idx]

    default = imagefolder(root=str(tmp_path), load_size=S, img_size=S, val_fraction=0.25)
    assert {default.train.bad_files, default.val.bad_files, default.test.bad_files} == {"skip"}
    image, label = default.test[test_idx]
    assert image.shape == (3, S, S) and default.test.num_skipped == 1


def test_unlabeled_folder_policy(tmp_path: Path) -> None:
    write_good(tmp_path / "a" / "0.png", 0)
    bad = make_bad(tmp_path / "a", "zero_bytes", "1")
    write_good(tmp_path / "b" / "2.png", 2)
    splits = unlabeled_folder(root=str(tmp_path), load_size=S, img_size=S, bad_files="fail")
    with pytest.raises(ImageDecodeError, match=re.escape(str(bad))):
        splits.train[1]
    skip = unlabeled_folder(root=str(tmp_path), load_size=S, img_size=S)
    image, label = skip.train[1]
    assert torch.equal(image, decode(tmp_path / "b" / "2.png")) and label == -1 and skip.train.num_skipped == 1


def test_folder_configs_default_to_skip(tmp_path: Path) -> None:
    from hydra.utils import instantiate

    write_good(tmp_path / "train" / "x" / "0.png", 0)
    for name, extra in (("imagefolder", {"val_fraction": 0.0}), ("unlabeled_folder", {})):
        cfg = OmegaConf.load(CONF_DIR / f"{name}.yaml")
        assert cfg.bad_files == "skip"
        kw = dict(root=str(tmp_path), load_size=S, img_size=S, **extra)
        assert instantiate(cfg, **kw).train.bad_files == "skip"
        assert instantiate(cfg, **kw, bad_files="fail").train.bad_files == "fail"


# ------------------------------------------------------------------------------ (e) validation


@pytest.mark.parametrize("policy", ["ignore", "Skip", "", "raise"])
def test_invalid_policy_is_rejected(tmp_path: Path, policy: str) -> None:
    good = write_good(tmp_path / "train" / "x" / "0.png", 0)
    with pytest.raises(ValueError, match=r"dataset\.bad_files"):
        ImageFileDataset([(str(good), 0)], resize=S, crop=S, in_chans=3, bad_files=policy)
    with pytest.raises(ValueError, match=r"dataset\.bad_files"):
        imagefolder(root=str(tmp_path), load_size=S, img_size=S, bad_files=policy)
    with pytest.raises(ValueError, match=r"dataset\.bad_files"):
        unlabeled_folder(root=str(tmp_path), load_size=S, img_size=S, bad_files=policy)


# ------------------------------------------------------------------------------ (f) mostly bad data


def test_all_bad_items_raise_corrupt(tmp_path: Path) -> None:
    paths = [make_bad(tmp_path, kind, kind) for kind in sorted(BAD_KINDS)]
    ds = dataset(paths)
    with pytest.raises(RuntimeError, match=r"4 consecutive items from index 2 .*corrupt"):
        ds[2]
    assert ds.num_skipped == 4


def test_long_run_of_bad_items_raises_corrupt(tmp_path: Path) -> None:
    # More bad files in a row than the limit: give up instead of scanning the whole data set.
    limit = D.MAX_CONSECUTIVE_BAD
    paths = [make_bad(tmp_path, "zero_bytes", f"{k:02d}") for k in range(limit + 2)]
    paths.append(write_good(tmp_path / "good.png", 0))
    ds = dataset(paths)
    with pytest.raises(RuntimeError, match=rf"{limit} consecutive items from index 0 .*corrupt"):
        ds[0]
    assert ds.num_skipped == limit
    image, label = ds[limit + 1]  # fewer than the limit before a good file: replaced
    assert torch.equal(image, decode(paths[-1])) and label == limit + 2
