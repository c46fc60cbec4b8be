"""The `visualize` entry point end to end on a tiny exported ViT and synthetic data."""

from __future__ import annotations

import pytest
from PIL import Image

from conftest import compose_cfg
from vfm import visualize
from vfm.backbones import Backbone
from vfm.config import ConfigError

BASE = ["dataset=synthetic", "backbone.patch_size=7", "trainer.device=cpu"]


@pytest.fixture(scope="module")
def tiny_vit_ckpt(tmp_path_factory):
    bb = Backbone("vit_tiny_patch16_224", img_size=28, patch_size=7, in_chans=1,
                  model_kwargs={"depth": 2, "embed_dim": 32, "num_heads": 2})
    return bb.export(tmp_path_factory.mktemp("ckpt") / "encoder.safetensors")


def _grid_px(n: int, tile: int, pad: int = 2) -> int:
    return n * (tile + pad) + pad  # torchvision make_grid: padding around and between tiles


def test_writes_readable_pngs_of_the_expected_size(tiny_vit_ckpt, tmp_path):
    cfg = compose_cfg(BASE + [f"checkpoint={tiny_vit_ckpt}", "num_images=3"], tmp_path / "run", "visualize")
    paths = visualize.run(cfg)
    assert set(paths) == {"attention", "pca"}
    tile = 28 * 4  # 28 px images are upsampled 4x by default
    with Image.open(paths["attention"]) as im:  # 3 rows: the image, then 2 heads
        assert im.format == "PNG" and im.mode == "RGB" and im.size == (_grid_px(3, tile), _grid_px(3, tile))
    with Image.open(paths["pca"]) as im:  # 2 rows (images, PCA) x 3 images
        assert im.size == (_grid_px(3, tile), _grid_px(2, tile))
    assert paths["attention"] == str(tmp_path / "run" / "attention.png")

    cfg = compose_cfg(BASE + [f"checkpoint={tiny_vit_ckpt}", "num_images=2", "threshold=0.6", "scale=1",
                              "foreground_threshold=0.5", "split=val"], tmp_path / "run2", "visualize")
    paths = visualize.run(cfg)
    with Image.open(paths["attention"]) as im:
        assert im.size == (_grid_px(3, 28), _grid_px(2, 28))
        im.load()


def test_resnet_checkpoint_is_a_clear_config_error(tmp_path):
    path = Backbone("resnet18", in_chans=1).export(tmp_path / "resnet.safetensors")
    cfg = compose_cfg(BASE + [f"checkpoint={path}"], tmp_path / "run", "visualize")
    with pytest.raises(ConfigError, match="need a ViT with patch tokens.*ResNet"):
        visualize.run(cfg)


def test_config_errors(tiny_vit_ckpt, tmp_path):
    with pytest.raises(ConfigError, match="checkpoint"):
        visualize.run(compose_cfg(BASE, tmp_path / "run", "visualize"))
    for bad, match in (("split=dev", "split"), ("threshold=1.5", "threshold"), ("num_images=0", "num_images")):
        cfg = compose_cfg(BASE + [f"checkpoint={tiny_vit_ckpt}", bad], tmp_path / "run", "visualize")
        with pytest.raises(ConfigError, match=match):
            visualize.run(cfg)
