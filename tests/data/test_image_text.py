"""Image–text data: CSV/TSV reader, webdataset shards (map-style), template captions, the collate, configs."""

from __future__ import annotations

import gzip
import io
import json
import logging
import pickle
import struct
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from vfm.data.collate import ImageTextCollate
from vfm.data.datasets import ImageDecodeError, TensorImageDataset, load_image
from vfm.data.image_text import CaptionedDataset, ImageTextCSV, WebDatasetShards, captioned, expand_urls
from vfm.data.image_text import shards as SH
from vfm.data.loader import build_train_loader
from vfm.data.prompts import CAPTION_TEMPLATES, FASHION_MNIST_CLASS_NAMES_NATURAL, ZERO_SHOT_TEMPLATES
from vfm.data.sampler import SeededDataset
from vfm.data.transforms import MultiCropAugmentation

DEBIAN_FASHION = Path("/usr/share/datasets/fashion-mnist")
S = 8  # img_size of every test: tiny images keep decoding cheap


def image_bytes(seed: int, size: tuple[int, int] = (12, 9), mode: str = "RGB", fmt: str = "PNG") -> bytes:
    """A small random image, encoded."""
    rng = np.random.default_rng(seed)
    shape = (size[1], size[0], 3) if mode == "RGB" else (size[1], size[0])
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode).save(buf, fmt)
    return buf.getvalue()


def decoded(data: bytes | Path, in_chans: int = 3) -> torch.Tensor:
    """What ImageFileDataset would give for this image (the reference decoder)."""
    src = io.BytesIO(data) if isinstance(data, bytes) else data
    return load_image(src, resize=S, crop=S, in_chans=in_chans)  # type: ignore[arg-type]


def write_csv(path: Path, header: str, rows: list[str]) -> Path:
    path.write_text("\n".join([header, *rows]) + "\n")
    return path


@pytest.fixture
def image_dir(tmp_path: Path) -> Path:
    d = tmp_path / "imgs"
    d.mkdir()
    (d / "a.png").write_bytes(image_bytes(0, (12, 9)))
    (d / "b.jpg").write_bytes(image_bytes(1, (7, 11), fmt="JPEG"))
    (d / "c.png").write_bytes(image_bytes(2, (8, 8), mode="L"))
    (d / "broken.jpg").write_bytes(b"this is not a jpeg")
    return d


# --------------------------------------------------------------------------------------------
# CSV / TSV
# --------------------------------------------------------------------------------------------


def test_csv_reads_rows_relative_to_the_csv(tmp_path: Path, image_dir: Path) -> None:
    csv_path = write_csv(tmp_path / "train.csv", "filepath,title,extra",
                         ["imgs/a.png, a red thing ,x", f"{image_dir / 'b.jpg'},\"a photo, with a comma\",y",
                          "imgs/c.png,gray,z"])
    ds = ImageTextCSV(csv_path, img_size=S, in_chans=3)
    assert len(ds) == 3
    for i, (name, caption) in enumerate([("a.png", "a red thing"), ("b.jpg", "a photo, with a comma"),
                                         ("c.png", "gray")]):
        image, cap, label = ds[i]
        assert image.dtype == torch.uint8 and image.shape == (3, S, S)
        assert torch.equal(image, decoded(image_dir / name))
        assert (cap, label) == (caption, -1)
    gray = ImageTextCSV(csv_path, img_size=S, in_chans=1)
    assert gray[0][0].shape == (1, S, S) and torch.equal(gray[0][0], decoded(image_dir / "a.png", 1))


def test_csv_skips_and_counts_missing_files_and_empty_captions(tmp_path, image_dir, caplog) -> None:
    rows = [f"imgs/{'a.png' if i % 2 else 'c.png'},caption {i}" for i in range(10)]
    rows[3] = "imgs/nope.png,lost"
    rows[6] = "imgs/a.png,   "
    csv_path = write_csv(tmp_path / "train.csv", "filepath,title", rows)
    with caplog.at_level(logging.WARNING, logger="vfm.data"):
        ds = ImageTextCSV(csv_path, img_size=S, max_bad_fraction=0.2)
    assert len(ds) == 8 and ds.skipped_rows == 2
    assert [c for _, c, _ in (ds[i] for i in range(len(ds)))] == [f"caption {i}" for i in range(10) if i not in (3, 6)]
    msg = caplog.text
    assert "skipped 2 of 10 rows" in msg and "nope.png" in msg and "line 5" in msg and "empty caption" in msg
    assert all(r.name == "vfm.data" for r in caplog.records)


def test_csv_undecodable_image_is_replaced_by_the_next_item(tmp_path, image_dir, caplog) -> None:
    csv_path = write_csv(tmp_path / "t.csv", "filepath,title", ["imgs/a.png,first", "imgs/broken.jpg,broken",
                                                              "imgs/b.jpg,third", "imgs/broken.jpg,last"])
    ds = ImageTextCSV(csv_path, img_size=S, max_bad_fraction=0.0)  # undecodable files pass construction
    with caplog.at_level(logging.WARNING, logger="vfm.data"):
        image, caption, _ = ds[1]
        assert caption == "third" and torch.equal(image, ds[2][0])
        assert ds[3][1] == "first"  # wraps around: (i + 1) % n
    assert ds.num_skipped == 2
    assert "broken.jpg" in caplog.text and "2 undecodable image(s)" in caplog.text
    all_bad = ImageTextCSV(write_csv(tmp_path / "bad.csv", "filepath,title", ["imgs/broken.jpg,x"] * 3), img_size=S)
    with pytest.raises(RuntimeError, match="consecutive items"):
        all_bad[0]


def test_csv_too_many_bad_rows_raises_naming_the_file(tmp_path, image_dir) -> None:
    csv_path = write_csv(tmp_path / "mostly_bad.csv", "filepath,title", ["imgs/a.png,ok", "x.png,gone", "imgs/b.jpg,"])
    with pytest.raises(ValueError, match=r"mostly_bad\.csv: 2 of 3 rows .*line 3: image .*x\.png not found"):
        ImageTextCSV(csv_path, img_size=S)


def test_tsv_default_separator_and_custom_keys(tmp_path, image_dir) -> None:
    path = write_csv(tmp_path / "train.tsv", "img\tcap", ["imgs/a.png\tcommas, are, fine", "imgs/c.png\tgray"])
    ds = ImageTextCSV(path, img_key="img", caption_key="cap", img_size=S)
    assert [ds[i][1] for i in range(2)] == ["commas, are, fine", "gray"]
    # open_clip's `--csv-separator "\t"` arrives as a backslash and a t: read as a tab.
    other = tmp_path / "train.txt"
    other.write_text(path.read_text())
    assert ImageTextCSV(other, img_key="img", caption_key="cap", sep="\\t", img_size=S)[1][1] == "gray"


def test_csv_missing_column_names_file_and_columns(tmp_path, image_dir) -> None:
    path = write_csv(tmp_path / "cols.csv", "path,caption", ["imgs/a.png,x"])
    with pytest.raises(ValueError, match=r"cols\.csv has no column 'filepath' or 'title'; its columns are \['path', 'caption'\]"):
        ImageTextCSV(path, img_size=S)
    tsv_as_csv = write_csv(tmp_path / "tabs.csv", "filepath\ttitle", ["imgs/a.png\tx"])
    with pytest.raises(ValueError, match="separator"):
        ImageTextCSV(tsv_as_csv, img_size=S)


# --------------------------------------------------------------------------------------------
# webdataset shards
# --------------------------------------------------------------------------------------------


def write_tar(path: Path, members: list[tuple[str, bytes]]) -> Path:
    with tarfile.open(path, "w") as tf:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return path


@pytest.fixture
def shards(tmp_path: Path) -> tuple[Path, list[tuple[bytes, str, int]]]:
    """Two shards; returns the folder and the expected good samples (image bytes, caption, label) in order."""
    d = tmp_path / "wds"
    d.mkdir()
    img = [image_bytes(10 + i, fmt="JPEG" if i == 1 else "PNG") for i in range(8)]
    write_tar(d / "shard-000000.tar", [
        ("s0.png", img[0]), ("s0.txt", b"caption zero\n"), ("s0.cls", b"3"),
        ("sub/s1.jpg", img[1]), ("sub/s1.txt", b"caption one"),
        ("s2.png", img[2]),  # no caption: skipped at index time
        ("s3.jpg", b"corrupt bytes"), ("s3.txt", b"broken image"), ("s3.cls", b"1"),
    ])
    write_tar(d / "shard-000001.tar", [
        ("s4.png", img[4]), ("s4.txt", "caption four, ünïcode".encode()), ("s4.cls", b"2"),
        ("s5.png", img[5]), ("s5.txt", b"   "),  # empty caption: skipped
        ("s6.txt", b"no image"),  # no image: skipped
        # key "s7", extensions "a.png"/"a.txt": neither an image nor a caption, so skipped
        ("s7.a.png", img[7]), ("s7.a.txt", b"caption seven"), ("s7.a.cls", b"0"),
    ])
    expected = [(img[0], "caption zero", 3), (img[1], "caption one", -1), (b"corrupt bytes", "broken image", 1),
                (img[4], "caption four, ünïcode", 2)]
    return d, expected


def test_expand_urls_braces_globs_lists(tmp_path: Path, shards) -> None:
    d, _ = shards
    a, b = str(d / "shard-000000.tar"), str(d / "shard-000001.tar")
    assert expand_urls(str(d / "shard-{000000..000001}.tar")) == [a, b]
    assert expand_urls(str(d / "shard-00000{0,1}.tar")) == [a, b]
    assert expand_urls(str(d / "shard-*.tar")) == [a, b]
    assert expand_urls([b, a]) == [b, a]
    assert expand_urls(f"{a}::{b}") == [a, b]
    assert SH._expand_braces("x{8..10}y{a,b}") == ["x8ya", "x8yb", "x9ya", "x9yb", "x10ya", "x10yb"]
    with pytest.raises(FileNotFoundError, match=r"1 of 3 shards do not exist"):
        expand_urls(str(d / "shard-{000000..000002}.tar"))
    with pytest.raises(ValueError, match="not a local file"):
        expand_urls("https://example.com/shard-000000.tar")


def test_webdataset_index_items_labels_and_skips(shards, caplog) -> None:
    d, expected = shards
    with caplog.at_level(logging.WARNING, logger="vfm.data"):
        ds = WebDatasetShards(str(d / "shard-{000000..000001}.tar"), img_size=S, max_bad_fraction=0.75)
    # s7.a.png / s7.a.txt share the key "s7" with ext "a.png"/"a.txt": neither is an image nor a caption.
    assert len(ds) == 4 and ds.skipped_samples == 4
    assert [ds.key(i) for i in range(4)] == ["s0", "sub/s1", "s3", "s4"]
    assert "shard-000000.tar: skipped 1 of 4 samples" in caplog.text and "s2: no caption" in caplog.text
    assert "s5: empty caption" in caplog.text and "s6: no image" in caplog.text
    assert (d / "shard-000000.tar.idx.json").is_file() and (d / "shard-000001.tar.idx.json").is_file()
    assert ds.labels.tolist() == [3, -1, 1, 2]
    for i in (0, 1, 3):
        image, caption, label = ds[i]
        assert image.dtype == torch.uint8 and image.shape == (3, S, S)
        assert torch.equal(image, decoded(expected[i][0])) and (caption, label) == expected[i][1:]
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="vfm.data"):
        image, caption, label = ds[2]  # corrupt: replaced by the next item
    assert (caption, label) == ("caption four, ünïcode", 2) and ds.num_skipped == 1
    assert "shard-000000.tar:s3" in caplog.text and "BytesIO" not in caplog.text


def test_webdataset_index_cache_is_reused_and_optional(shards, monkeypatch) -> None:
    d, _ = shards
    url = str(d / "shard-000000.tar")
    first = WebDatasetShards(url, img_size=S, max_bad_fraction=0.5)
    cache = json.loads((d / "shard-000000.tar.idx.json").read_text())
    assert cache["keys"] == ["s0", "sub/s1", "s3"] and cache["num_bad"] == 1

    def no_scan(shard: str) -> dict:
        raise AssertionError("the cached index should have been used")

    monkeypatch.setattr(SH, "_scan_shard", no_scan)
    again = WebDatasetShards(url, img_size=S, max_bad_fraction=0.5)
    assert [again[i][1] for i in range(len(again))] == [first[i][1] for i in range(len(first))]
    monkeypatch.undo()
    # Where the cache cannot be written (here: a folder is in the way), the shard is just scanned.
    write_tar(d / "other.tar", [("k.png", image_bytes(0)), ("k.txt", b"hi")])
    (d / "other.tar.idx.json").mkdir()
    assert WebDatasetShards(str(d / "other.tar"), img_size=S)[0][1] == "hi"
    assert not list(d.glob("*.tmp"))


def test_webdataset_too_many_bad_samples_raises_naming_the_shard(shards) -> None:
    d, _ = shards
    with pytest.raises(ValueError, match=r"shard-000001\.tar: 3 of 4 samples .*s5: empty caption"):
        WebDatasetShards(str(d / "shard-000001.tar"), img_size=S, max_bad_fraction=0.5)


def test_webdataset_same_items_with_dataloader_workers(shards) -> None:
    d, _ = shards
    ds = WebDatasetShards(str(d / "shard-{000000..000001}.tar"), img_size=S, max_bad_fraction=0.75)
    ds[0]  # opens a handle in the parent: workers must reopen theirs, not share its offset
    want = [ds[i] for i in range(len(ds))]
    got = list(DataLoader(ds, batch_size=None, num_workers=2))
    assert len(got) == len(want)
    for (ga, gc, gl), (wa, wc, wl) in zip(got, want):
        assert torch.equal(ga, wa) and gc == wc and int(gl) == wl
    clone = pickle.loads(pickle.dumps(ds))  # spawn-started workers get a pickled copy
    assert clone[3][1] == want[3][1]


def test_webdataset_skips_are_counted_across_dataloader_workers(shards) -> None:
    # One counting rule for every lazily decoded dataset: the workers' skips add up in the main process.
    d, _ = shards
    ds = WebDatasetShards(str(d / "shard-{000000..000001}.tar"), img_size=S, max_bad_fraction=0.75)
    assert len(list(DataLoader(ds, batch_size=None, num_workers=2))) == 4  # item 2 is corrupt: replaced
    assert ds.num_skipped == 1
    ds[2]
    assert ds.num_skipped == 2


def test_webdataset_fail_policy_names_the_sample(shards) -> None:
    d, _ = shards
    ds = WebDatasetShards(str(d / "shard-{000000..000001}.tar"), img_size=S, max_bad_fraction=0.75, bad_files="fail")
    with pytest.raises(ImageDecodeError, match=r"shard-000000\.tar:s3: .*dataset\.bad_files=skip"):
        ds[2]
    assert ds.num_skipped == 0 and ds[3][1] == "caption four, ünïcode"


def test_webdataset_with_build_train_loader_and_image_text_collate(shards) -> None:
    d, _ = shards
    ds = WebDatasetShards(str(d / "shard-*.tar"), img_size=S, max_bad_fraction=0.75)
    augment = MultiCropAugmentation(global_crop_size=S, local_crop_size=4, n_global=1, n_local=0,
                                    mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))

    def tokenizer(captions: list[str]) -> torch.Tensor:
        return torch.tensor([[len(c), c.count(" ")] for c in captions])

    loader, sampler = build_train_loader(ds, batch_size=2, collate_fn=ImageTextCollate(augment, tokenizer), seed=3)
    sampler.set_epoch(0)
    batches = list(loader)
    assert len(batches) == 2
    for batch in batches:
        assert set(batch) == {"crops", "text", "captions", "label"}
        assert len(batch["crops"]) == 1 and batch["crops"][0].shape == (2, 3, S, S)
        assert batch["crops"][0].dtype == torch.float32 and batch["text"].shape == (2, 2)
        assert all(isinstance(c, str) for c in batch["captions"]) and batch["label"].dtype == torch.int64
    sampler.set_epoch(0)
    assert all(torch.equal(a["crops"][0], b["crops"][0]) for a, b in zip(batches, loader))


# --------------------------------------------------------------------------------------------
# Captions from labels
# --------------------------------------------------------------------------------------------


def labelled(n: int = 40, k: int = 4) -> TensorImageDataset:
    images = torch.arange(n, dtype=torch.uint8).view(n, 1, 1, 1).expand(n, 1, 4, 4).contiguous()
    return TensorImageDataset(images, torch.arange(n) % k)


def test_captioned_dataset_deterministic_captions() -> None:
    names = ["cat", "dog", "ankle boot", "bag"]
    ds = CaptionedDataset(labelled(), names, CAPTION_TEMPLATES, seed=5)
    items = [ds[i] for i in range(len(ds))]
    assert [c for _, c, _ in items] == [CaptionedDataset(labelled(), names, seed=5)[i][1] for i in range(len(ds))]
    assert all(c == CAPTION_TEMPLATES[ds.template_index(i)].format(names[lab]) for i, (_, c, lab) in enumerate(items))
    assert all(names[lab] in c for _, c, lab in items)
    assert len({ds.template_index(i) for i in range(len(ds))}) >= 5  # the templates are actually mixed
    assert ds.captions == [c for _, c, _ in items]  # the same captions without reading an image
    other = CaptionedDataset(labelled(), names, seed=6)
    assert [other[i][1] for i in range(len(ds))] != [c for _, c, _ in items]
    with pytest.raises(ValueError, match="exactly one"):
        CaptionedDataset(labelled(), names, ["no slot"])


def test_captioned_dataset_keep_classes() -> None:
    base = labelled()
    full = CaptionedDataset(base, ["a", "b", "c", "d"], seed=1)
    ds = CaptionedDataset(base, ["a", "b", "c", "d"], seed=1, keep_classes=[3, 1])
    assert len(ds) == 20 and set(ds.labels.tolist()) == {1, 3}
    for i in range(len(ds)):
        image, caption, label = ds[i]
        j = int(ds.indices[i])
        assert label in (1, 3) and torch.equal(image, base[j][0]) and caption == full[j][1]
    assert torch.equal(ds.images, base.images[ds.indices]) and ds.images.shape[0] == len(ds.labels)
    assert ds.captions == [ds[i][1] for i in range(len(ds))]
    with pytest.raises(ValueError, match=r"keep_classes must be in \[0, 4\)"):
        CaptionedDataset(base, ["a", "b", "c", "d"], keep_classes=[4])


def write_fake_fashion(directory: Path, n_train: int = 60, n_test: int = 20) -> None:
    """Tiny idx files in the Fashion-MNIST layout (labels i % 10)."""
    directory.mkdir(parents=True)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        for kind, array in (("images", np.full((n, 28, 28), 7, np.uint8)), ("labels", np.arange(n, dtype=np.uint8) % 10)):
            header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
            with gzip.open(directory / f"{prefix}-{kind}-idx{array.ndim}-ubyte.gz", "wb") as f:
                f.write(header + array.tobytes())


def test_captioned_builder_holds_out_classes(tmp_path: Path) -> None:
    write_fake_fashion(tmp_path / "fashion-mnist")
    splits = captioned(root=str(tmp_path), held_out_classes=[8, 9], system_dirs=[])
    assert splits.class_names == FASHION_MNIST_CLASS_NAMES_NATURAL and splits.num_classes == 10
    assert isinstance(splits.train, CaptionedDataset)
    assert not {8, 9} & set(splits.train.labels.tolist())
    captions = [splits.train[i][1] for i in range(len(splits.train))]
    assert all("bag" not in c and "ankle boot" not in c for c in captions)
    assert set(splits.test.labels.tolist()) == set(range(10))
    # every test image has a caption (held-out classes included) by the training rule, for retrieval
    rule = CaptionedDataset(splits.test, FASHION_MNIST_CLASS_NAMES_NATURAL, CAPTION_TEMPLATES, seed=0)
    assert splits.test_captions == [rule[i][1] for i in range(len(splits.test))] and len(splits.test_captions) == 20
    assert all(FASHION_MNIST_CLASS_NAMES_NATURAL[int(y)] in c for c, y in zip(splits.test_captions, splits.test.labels))
    with pytest.raises(ValueError, match="held_out_classes"):
        captioned(root=str(tmp_path), held_out_classes=[10], system_dirs=[])


@pytest.mark.skipif(not DEBIAN_FASHION.is_dir(), reason="Fashion-MNIST not installed in /usr/share/datasets")
def test_captioned_builder_on_fashion_mnist(tmp_path: Path) -> None:
    splits = captioned(root=str(tmp_path), held_out_classes=[0, 5])
    train_labels = set(splits.train.labels.tolist())
    assert train_labels == set(range(10)) - {0, 5}
    assert set(splits.val.labels.tolist()) == set(range(10)) and set(splits.test.labels.tolist()) == set(range(10))
    image, caption, label = splits.train[0]
    assert image.shape == (1, 28, 28) and FASHION_MNIST_CLASS_NAMES_NATURAL[label] in caption


# --------------------------------------------------------------------------------------------
# Collate and seeded samples
# --------------------------------------------------------------------------------------------


def test_seeded_dataset_appends_the_seed_to_any_tuple() -> None:
    assert SeededDataset(labelled())[(2, 9)][1:] == (2, 9)
    item = SeededDataset(CaptionedDataset(labelled(), list("abcd")))[(2, 9)]
    assert len(item) == 4 and item[2:] == (2, 9) and isinstance(item[1], str)


def test_image_text_collate_shapes_and_determinism() -> None:
    augment = MultiCropAugmentation(global_crop_size=4, local_crop_size=2, n_global=1, n_local=0,
                                    mean=(0.5,), std=(0.25,))
    imgs = torch.randint(0, 256, (4, 1, S, S), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))

    def tokenizer(captions: list[str]) -> dict[str, torch.Tensor]:
        ids = torch.tensor([[ord(c[0]), len(c)] for c in captions])
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}

    collate = ImageTextCollate(augment, tokenizer)

    def samples(seed: int) -> list[tuple]:
        return [(imgs[i], f"caption {i}", i - 1, seed) for i in range(4)]

    out = collate(samples(11))
    assert set(out) == {"crops", "text", "captions", "label"}
    assert len(out["crops"]) == 1 and out["crops"][0].shape == (4, 1, 4, 4)
    assert out["text"]["input_ids"].shape == (4, 2) and out["captions"] == [f"caption {i}" for i in range(4)]
    assert out["label"].tolist() == [-1, 0, 1, 2] and out["label"].dtype == torch.int64
    assert torch.equal(collate(samples(11))["crops"][0], out["crops"][0])
    assert not torch.equal(collate(samples(12))["crops"][0], out["crops"][0])
    with pytest.raises(ValueError, match="different seeds"):
        collate(samples(11)[:2] + samples(12)[2:])
    with pytest.raises(ValueError, match=r"\(image, caption, label, seed\)"):
        collate([(imgs[0], 0, 11)])


# --------------------------------------------------------------------------------------------
# Configs
# --------------------------------------------------------------------------------------------


def test_dataset_configs_match_their_builders(tmp_path: Path, image_dir: Path, shards) -> None:
    from hydra.utils import instantiate

    from conftest import compose_cfg
    from vfm.config import ConfigError, validate_node

    write_csv(tmp_path / "train.csv", "filepath,title", ["imgs/a.png,one", "imgs/b.jpg,two"])
    d, _ = shards
    for name, extra in [
        ("image_text_csv", [f"dataset.train_csv={tmp_path / 'train.csv'}", f"dataset.img_size={S}"]),
        ("webdataset", [f"dataset.urls=\"{d}/shard-{{000000..000001}}.tar\"", "dataset.max_bad_fraction=0.75",
                        f"dataset.img_size={S}"]),
    ]:
        cfg = compose_cfg([f"dataset={name}"])
        with pytest.raises(ConfigError, match=r"missing required value dataset\.(train_csv|urls)"):
            validate_node(cfg.dataset, "dataset")
        cfg = compose_cfg([f"dataset={name}", *extra])
        validate_node(cfg.dataset, "dataset")
        splits = instantiate(cfg.dataset)
        assert splits.num_classes == 0 and splits.val is None and splits.train[0][0].shape == (3, S, S)
    cfg = compose_cfg(["dataset=fashion_mnist_captions"])
    validate_node(cfg.dataset, "dataset")
    assert cfg.dataset.held_out_classes == [] and cfg.dataset.img_size == 28


def test_prompt_lists() -> None:
    assert len(CAPTION_TEMPLATES) == 10 and all(t.count("{}") == 1 for t in CAPTION_TEMPLATES + ZERO_SHOT_TEMPLATES)
    assert len(FASHION_MNIST_CLASS_NAMES_NATURAL) == 10
