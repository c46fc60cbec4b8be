"""Dataset builders: idx parsing, file lookup, splits, folders, synthetic data, the Hydra nodes."""

from __future__ import annotations

import gzip
import importlib
import inspect
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

from vfm.data import datasets as D
from vfm.data.datasets import DatasetNotFoundError, TensorImageDataset

CONF_DIR = Path(__file__).resolve().parents[2] / "conf" / "dataset"
DEBIAN_FASHION = Path("/usr/share/datasets/fashion-mnist")




def write_idx(path: Path, array: np.ndarray, *, gz: bool = True, magic: bytes | None = None) -> Path:
    """Write ``array`` (uint8) as an idx file, the format of (Fashion-)MNIST."""
    header = magic if magic is not None else bytes([0, 0, 0x08, array.ndim])
    header += struct.pack(f">{array.ndim}I", *array.shape)
    data = header + array.astype(np.uint8).tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    if gz:
        path = path.with_name(path.name + ".gz")
        with gzip.open(path, "wb") as f:
            f.write(data)
    else:
        path.write_bytes(data)
    return path


def write_fake_mnist(directory: Path, n_train: int = 30, n_test: int = 10, size: int = 28, gz: bool = True) -> None:
    """Tiny idx files; image i is filled with value i so images identify their source index."""
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        images = np.broadcast_to(np.arange(n, dtype=np.uint8)[:, None, None], (n, size, size)).copy()
        labels = (np.arange(n) % 10).astype(np.uint8)
        write_idx(directory / f"{prefix}-images-idx3-ubyte", images, gz=gz)
        write_idx(directory / f"{prefix}-labels-idx1-ubyte", labels, gz=gz)


# ---------------------------------------------------------------------------------------- idx


@pytest.mark.parametrize("gz", [True, False])
def test_read_idx_roundtrip(tmp_path: Path, gz: bool) -> None:
    images = np.random.default_rng(0).integers(0, 256, size=(5, 7, 6), dtype=np.uint8)
    path = write_idx(tmp_path / "imgs-idx3-ubyte", images, gz=gz)
    out = D.read_idx(path)
    assert out.dtype == torch.uint8 and out.shape == (5, 7, 6)
    assert np.array_equal(out.numpy(), images)
    labels = D.read_idx(write_idx(tmp_path / "labels-idx1-ubyte", np.arange(5, dtype=np.uint8), gz=gz))
    assert labels.tolist() == [0, 1, 2, 3, 4]


def test_read_idx_bad_magic(tmp_path: Path) -> None:
    path = write_idx(tmp_path / "bad", np.zeros((2, 3), np.uint8), magic=b"\x12\x34\x08\x02")
    with pytest.raises(ValueError, match="magic"):
        D.read_idx(path)


def test_read_idx_truncated(tmp_path: Path) -> None:
    path = tmp_path / "short"
    path.write_bytes(bytes([0, 0, 8, 1]) + struct.pack(">I", 10) + b"\x00" * 3)
    with pytest.raises(ValueError, match="truncated or corrupt"):
        D.read_idx(path)


def test_read_idx_not_gzip(tmp_path: Path) -> None:
    path = tmp_path / "x.gz"
    path.write_bytes(b"not gzip at all")
    with pytest.raises(ValueError, match="cannot read"):
        D.read_idx(path)


# ------------------------------------------------------------------------------ fashion_mnist


@pytest.mark.parametrize("layout", ["FashionMNIST/raw", "fashion-mnist", "."])
def test_fashion_mnist_lookup_and_splits(tmp_path: Path, layout: str) -> None:
    write_fake_mnist(tmp_path / layout, gz=layout != "fashion-mnist")  # plain and gzipped files
    splits = D.fashion_mnist(root=str(tmp_path), val_fraction=0.2, seed=3, system_dirs=())
    assert isinstance(splits.train, TensorImageDataset)
    assert (len(splits.train), len(splits.val), len(splits.test)) == (24, 6, 10)
    assert splits.train.images.shape == (24, 1, 28, 28) and splits.train.images.dtype == torch.uint8
    assert splits.train.labels.dtype == torch.int64
    # Disjoint and covering, labels still attached to their image (image i has label i % 10).
    train_ids = splits.train.images[:, 0, 0, 0].tolist()
    val_ids = splits.val.images[:, 0, 0, 0].tolist()
    assert sorted(train_ids + val_ids) == list(range(30))
    assert splits.train.labels.tolist() == [i % 10 for i in train_ids]
    assert splits.test.images[:, 0, 0, 0].tolist() == list(range(10))
    image, label = splits.val[0]
    assert image.shape == (1, 28, 28) and isinstance(label, int)
    assert (splits.img_size, splits.in_chans, splits.num_classes) == (28, 1, 10)
    assert splits.mean == (0.2860,) and splits.std == (0.3530,)
    assert splits.class_names[0] == "T-shirt/top"
    # The split is a function of the seed only.
    again = D.fashion_mnist(root=str(tmp_path), val_fraction=0.2, seed=3, system_dirs=())
    assert torch.equal(again.val.images, splits.val.images)
    other = D.fashion_mnist(root=str(tmp_path), val_fraction=0.2, seed=4, system_dirs=())
    assert not torch.equal(other.val.images, splits.val.images)


def test_fashion_mnist_system_dir(tmp_path: Path) -> None:
    write_fake_mnist(tmp_path / "system")
    splits = D.fashion_mnist(root=str(tmp_path / "empty"), val_fraction=0.0, system_dirs=(str(tmp_path / "system"),))
    assert len(splits.train) == 30 and splits.val is None


def test_fashion_mnist_not_found_message(tmp_path: Path) -> None:
    with pytest.raises(DatasetNotFoundError) as info:
        D.fashion_mnist(root=str(tmp_path), system_dirs=(str(tmp_path / "sys"),))
    message = str(info.value)
    for searched in (tmp_path / "FashionMNIST" / "raw", tmp_path / "fashion-mnist", tmp_path, tmp_path / "sys"):
        assert f"- {searched}\n" in message
    assert "make data" in message
    assert "apt install dataset-fashion-mnist" in message
    assert "dataset.download=true" in message
    assert isinstance(info.value, FileNotFoundError)


def test_fashion_mnist_declared_metadata_checked(tmp_path: Path) -> None:
    write_fake_mnist(tmp_path)
    with pytest.raises(ValueError, match="dataset.img_size=32"):
        D.fashion_mnist(root=str(tmp_path), img_size=32, system_dirs=())
    with pytest.raises(ValueError, match="dataset.in_chans=3"):
        D.fashion_mnist(root=str(tmp_path), in_chans=3, mean=(0.5,), std=(0.5,), system_dirs=())
    with pytest.raises(ValueError, match="dataset.num_classes=5"):
        D.fashion_mnist(root=str(tmp_path), num_classes=5, system_dirs=())
    with pytest.raises(ValueError, match="dataset.mean"):
        D.fashion_mnist(root=str(tmp_path), mean=(0.1, 0.2), system_dirs=())
    with pytest.raises(ValueError, match="val_fraction"):
        D.fashion_mnist(root=str(tmp_path), val_fraction=1.0, system_dirs=())


def test_mnist_torchvision_layout(tmp_path: Path) -> None:
    write_fake_mnist(tmp_path / "MNIST" / "raw", n_train=20, n_test=5, gz=False)
    splits = D.mnist(root=str(tmp_path), val_fraction=0.1, system_dirs=())
    assert (len(splits.train), len(splits.val), len(splits.test)) == (18, 2, 5)
    assert splits.mean == (0.1307,) and splits.class_names == [str(i) for i in range(10)]


@pytest.mark.skipif(not DEBIAN_FASHION.is_dir(), reason="Debian's dataset-fashion-mnist is not installed")
def test_fashion_mnist_debian_package(tmp_path: Path) -> None:
    splits = D.fashion_mnist(root=str(tmp_path))  # empty root: falls through to the system dir
    assert (len(splits.train), len(splits.val), len(splits.test)) == (54000, 6000, 10000)
    assert splits.train.images.shape[1:] == (1, 28, 28)
    assert splits.test.labels.bincount().tolist() == [1000] * 10
    # The configured normalisation statistics are the train set's.
    assert abs(splits.train.images.float().mean().item() / 255 - splits.mean[0]) < 2e-3


# ---------------------------------------------------------------------------------- helpers


def test_split_train_val_disjoint_and_sizes() -> None:
    ds = TensorImageDataset(torch.arange(100, dtype=torch.uint8).view(100, 1, 1, 1), torch.arange(100))
    train, val = D.split_train_val(ds, 0.25, seed=0)
    assert (len(train), len(val)) == (75, 25)
    assert set(train.labels.tolist()).isdisjoint(val.labels.tolist())
    assert sorted(train.labels.tolist() + val.labels.tolist()) == list(range(100))
    assert torch.equal(train.images.view(-1).long(), train.labels)
    assert D.split_train_val(ds, 0.0, seed=0)[1] is None
    assert len(D.split_train_val(ds, 0.001, seed=0)[1]) == 1  # asked for a val split: at least one
    with pytest.raises(ValueError, match="val_fraction"):
        D.split_train_val(ds, -0.1, seed=0)


def test_tensor_image_dataset_validation() -> None:
    with pytest.raises(ValueError, match="uint8"):
        TensorImageDataset(torch.zeros(2, 1, 4, 4), torch.zeros(2, dtype=torch.int64))
    with pytest.raises(ValueError, match="labels"):
        TensorImageDataset(torch.zeros(2, 1, 4, 4, dtype=torch.uint8), torch.zeros(3, dtype=torch.int64))
    ds = TensorImageDataset(torch.zeros(2, 1, 4, 4, dtype=torch.uint8), torch.tensor([3, -1], dtype=torch.int32))
    assert ds.labels.dtype == torch.int64 and ds[1][1] == -1
    assert len(D.labelled_subset(ds)) == 1


def test_torchvision_dataset_not_found(tmp_path: Path) -> None:
    with pytest.raises(DatasetNotFoundError, match="dataset.download=true"):
        D.benchmark(variant="cifar10", img_size=32, in_chans=3, mean=(0.5,0.5,0.5), std=(0.2,0.2,0.2), root=str(tmp_path))


# ---------------------------------------------------------------------------------- folders


def write_png(path: Path, size: tuple[int, int], color: tuple[int, int, int] = (200, 30, 60)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path)


def test_load_image_resize_and_center_crop(tmp_path: Path) -> None:
    array = np.zeros((10, 20, 3), np.uint8)  # 20 wide, 10 high: left half black, right half white
    array[:, 10:] = 255
    Image.fromarray(array).save(tmp_path / "a.png")
    out = D.load_image(tmp_path / "a.png", resize=10, crop=10, in_chans=3)
    assert out.shape == (3, 10, 10) and out.dtype == torch.uint8
    assert out[:, :, :5].eq(0).all() and out[:, :, 5:].eq(255).all()
    gray = D.load_image(tmp_path / "a.png", resize=5, crop=4, in_chans=1)
    assert gray.shape == (1, 4, 4)


def test_imagefolder(tmp_path: Path) -> None:
    sizes = [(40, 30), (30, 50), (33, 33), (64, 48)]
    for cls in ("cat", "dog"):
        for i, size in enumerate(sizes):
            write_png(tmp_path / "train" / cls / f"{i}.png", size)
        write_png(tmp_path / "val" / cls / "sub" / "x.PNG", (35, 36))  # nested, upper-case ext
    (tmp_path / "train" / "cat" / "notes.txt").write_text("not an image")
    splits = D.imagefolder(root=str(tmp_path), load_size=32, img_size=24, val_fraction=0.25, seed=0)
    assert splits.class_names == ["cat", "dog"] and splits.num_classes == 2
    assert (len(splits.train), len(splits.val), len(splits.test)) == (6, 2, 2)
    image, label = splits.train[0]
    assert image.shape == (3, 32, 32) and image.dtype == torch.uint8 and label in (0, 1)
    assert splits.val[0][0].shape == (3, 24, 24)
    assert splits.test[0][0].shape == (3, 24, 24) and sorted(splits.test.labels.tolist()) == [0, 1]
    assert splits.train[0][0][:, 5, 5].tolist() == [200, 30, 60]
    gray = D.imagefolder(root=str(tmp_path), load_size=32, img_size=24, in_chans=1, mean=(0.5,), std=(0.5,))
    assert gray.train[0][0].shape == (1, 32, 32) and gray.test is not None
    with pytest.raises(ValueError, match="dataset.num_classes=3"):
        D.imagefolder(root=str(tmp_path), num_classes=3, load_size=32, img_size=24)


def test_imagefolder_errors(tmp_path: Path) -> None:
    with pytest.raises(DatasetNotFoundError, match="does not exist"):
        D.imagefolder(root=str(tmp_path / "missing"))
    (tmp_path / "train" / "empty_class").mkdir(parents=True)
    with pytest.raises(DatasetNotFoundError, match="found no images"):
        D.imagefolder(root=str(tmp_path))
    write_png(tmp_path / "train" / "a" / "0.png", (8, 8))
    write_png(tmp_path / "val" / "zebra" / "0.png", (8, 8))
    with pytest.raises(ValueError, match="not among the training classes"):
        D.imagefolder(root=str(tmp_path), load_size=8, img_size=8)
    with pytest.raises(ValueError, match="img_size"):
        D.imagefolder(root=str(tmp_path), load_size=8, img_size=16)


def test_unlabeled_folder(tmp_path: Path) -> None:
    write_png(tmp_path / "a.png", (20, 20))
    write_png(tmp_path / "deep" / "er" / "b.jpg", (30, 12))
    (tmp_path / "deep" / "readme.md").write_text("skip me")
    splits = D.unlabeled_folder(root=str(tmp_path), load_size=16, img_size=12)
    assert len(splits.train) == 2 and splits.val is None and splits.test is None
    assert splits.num_classes == 0 and splits.class_names == []
    image, label = splits.train[1]
    assert image.shape == (3, 16, 16) and label == -1
    empty = tmp_path / "nothing"
    empty.mkdir()
    with pytest.raises(DatasetNotFoundError, match="found no images"):
        D.unlabeled_folder(root=str(empty))


# -------------------------------------------------------------------------------- synthetic


def test_synthetic_deterministic_and_shaped() -> None:
    a, b = D.synthetic(), D.synthetic()
    for split in ("train", "val", "test"):
        assert torch.equal(getattr(a, split).images, getattr(b, split).images)
        assert torch.equal(getattr(a, split).labels, getattr(b, split).labels)
    assert not torch.equal(D.synthetic(seed=1).train.images, a.train.images)
    assert a.train.images.shape == (512, 1, 28, 28) and a.train.images.dtype == torch.uint8
    assert a.train.labels.bincount().tolist() == [128] * 4
    rgb = D.synthetic(num_train=8, num_val=0, num_test=4, img_size=16, in_chans=3, num_classes=10)
    assert rgb.train.images.shape == (8, 3, 16, 16) and rgb.val is None
    assert rgb.mean == (0.5, 0.5, 0.5)  # a single value broadcasts to every channel


def test_synthetic_is_learnable() -> None:
    """Nearest class-mean on phase-invariant |FFT| features separates the classes."""
    s = D.synthetic(num_classes=8)

    def feats(ds: TensorImageDataset) -> torch.Tensor:
        x = ds.images.float() / 255
        return torch.fft.fft2(x - x.mean(dim=(-2, -1), keepdim=True)).abs().flatten(1)

    train_x, test_x = feats(s.train), feats(s.test)
    centroids = torch.stack([train_x[s.train.labels == c].mean(0) for c in range(8)])
    pred = torch.cdist(test_x, centroids).argmin(1)
    assert (pred == s.test.labels).float().mean() > 0.9


# ------------------------------------------------------------------------------ Hydra nodes


@pytest.mark.parametrize("path", sorted(CONF_DIR.glob("*.yaml")), ids=lambda p: p.stem)
def test_dataset_config_matches_builder(path: Path) -> None:

    cfg = OmegaConf.load(path)
    if "defaults" in cfg:  # a dataset built on another one (fashion_mnist_segmentation on fashion_mnist)
        bases = [OmegaConf.load(CONF_DIR / f"{d}.yaml") for d in cfg.defaults if d != "_self_"]
        cfg = OmegaConf.merge(*bases, {k: v for k, v in cfg.items() if k != "defaults"})
    module, _, name = cfg["_target_"].rpartition(".")
    assert module in ("vfm.data.datasets", "vfm.data.image_text", "vfm.data.datasets.segmentation")
    if name == "benchmark":  # the in-memory benchmarks share one builder, chosen by variant
        assert cfg["variant"] == path.stem
    elif name == "captioned":  # a benchmark with captions: <variant>_captions
        assert f"{cfg['variant']}_captions" == path.stem
    elif name == "benchmark_foreground":  # a benchmark with foreground masks: <variant>_segmentation
        assert f"{cfg['variant']}_segmentation" == path.stem
    else:
        assert name == path.stem
    builder = getattr(importlib.import_module(module), name)
    params = inspect.signature(builder).parameters
    if name == "synthetic_captions":  # forwards the rest to `synthetic`
        params = {**params, **inspect.signature(D.synthetic).parameters}
    if name in ("captioned", "benchmark_foreground"):  # forwards the rest to `benchmark`
        params = {**params, **inspect.signature(D.benchmark).parameters}
    params = {k: p for k, p in params.items() if p.kind is not inspect.Parameter.VAR_KEYWORD}
    keys = set(cfg.keys()) - {"_target_"}
    assert keys <= set(params), f"keys not in the builder's signature: {keys - set(params)}"
    assert {"img_size", "in_chans", "mean", "std"} <= keys
    assert "num_classes" in keys or name in ("image_text_csv", "webdataset")  # captions only: 0 by default
    assert all(p.kind is inspect.Parameter.KEYWORD_ONLY for k, p in params.items() if k not in ("train_csv", "val_csv", "urls"))


def test_synthetic_config_instantiates() -> None:
    from hydra.utils import instantiate

    splits = instantiate(OmegaConf.load(CONF_DIR / "synthetic.yaml"), num_train=16, num_val=4, num_test=4)
    assert isinstance(splits, D.DataSplits) and len(splits.train) == 16
    assert splits.mean == (0.5,) and splits.num_classes == 4


def test_corrupt_image_names_the_file(tmp_path: Path) -> None:
    (tmp_path / "broken.png").write_bytes(b"not a png")
    with pytest.raises(OSError, match="broken.png"):
        D.load_image(tmp_path / "broken.png", resize=8, crop=8, in_chans=3)
