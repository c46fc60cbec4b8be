"""The optional `Method` hooks: no-op defaults on every method, and the methods that fill them in."""

from __future__ import annotations

import functools

import torch

from vfm.backbones import Backbone
from vfm.data.collate import ImageTextCollate, MultiCropCollate
from vfm.data.masking import random_masks
from vfm.data.transforms import MultiCropAugmentation
from vfm.heads.text import TextTransformer
from vfm.methods.base import Method
from vfm.methods.clip import CLIP
from vfm.methods.dino import DINO
from vfm.methods.mae import MAE
from vfm.methods.vq_tokenizer import VQTokenizer


def _bb() -> Backbone:
    torch.manual_seed(0)
    return Backbone("vit_tiny_patch16_224", img_size=28, patch_size=7, in_chans=1,
                    model_kwargs=dict(depth=1, embed_dim=32, num_heads=2))


def _augment() -> MultiCropAugmentation:
    return MultiCropAugmentation(global_crop_size=28, local_crop_size=14, n_local=2, mean=[0.5], std=[0.25])


def _samples(n: int = 4) -> list[tuple[torch.Tensor, int, int]]:
    g = torch.Generator().manual_seed(0)
    return [(torch.randint(0, 256, (1, 28, 28), dtype=torch.uint8, generator=g), i % 2, 7) for i in range(n)]


def test_defaults_are_no_ops_and_the_collate_is_multi_crop(tmp_path):
    dino = DINO(_bb(), out_dim=16, hidden_dim=16, bottleneck_dim=8)
    images = torch.randint(0, 256, (2, 1, 28, 28), dtype=torch.uint8)
    assert dino.export_artifacts(tmp_path) == [] and not list(tmp_path.iterdir())
    assert dino.visualizations(images, mean=[0.5], std=[0.25]) == {}
    assert dino.report(images.float()) == {} and dino.report_images == 0
    assert dino.text_model is None
    assert not dino.needs_captions
    masking = functools.partial(random_masks, ratio=0.5)
    collate = dino.build_collate(_augment(), masking)
    assert isinstance(collate, MultiCropCollate) and collate.patch_size == 7
    batch = collate(_samples())
    assert len(batch["crops"]) == 4 and batch["masks"][0].shape == (4, 16)


def test_every_hook_is_declared_on_the_base():
    for name in ("build_collate", "export_artifacts", "visualizations", "report", "text_model",
                 "needs_captions", "needs_patch_tokens", "report_images"):
        assert name in vars(Method), name


def test_mae_visualizes_its_reconstructions():
    mae = MAE(_bb(), decoder_dim=16, decoder_depth=1, decoder_heads=2)
    mae.train()
    images = torch.randint(0, 256, (3, 1, 28, 28), dtype=torch.uint8)
    masking = functools.partial(random_masks, ratio=0.75)
    grids = mae.visualizations(images, mean=[0.5], std=[0.25], masking=masking)
    assert set(grids) == {"reconstruction"}
    grid = grids["reconstruction"]
    assert grid.ndim == 3 and grid.shape[0] == 3 and 0 <= grid.min() and grid.max() <= 1
    assert mae.training  # put back in training mode
    assert mae.visualizations(images, mean=[0.5], std=[0.25]) == {}  # nothing masked, nothing to show


def test_tokenizer_reports_its_codebook_and_exports_its_file(tmp_path):
    m = VQTokenizer(_bb(), target="pixels", num_codes=16, code_dim=8, decoder_dim=16, decoder_depth=1, decoder_heads=2)
    m.eval()
    x = torch.randn(8, 1, 28, 28)
    assert m.report_images > 0
    assert m.report(x) == m.codebook_report(x)
    assert m.export_artifacts(tmp_path) == [tmp_path / "tokenizer.pt"] and (tmp_path / "tokenizer.pt").is_file()


def test_clip_is_its_own_text_model_and_collates_captions():
    tower = TextTransformer(context_length=16, width=32, layers=1, heads=2, output_dim=16)
    clip = CLIP(_bb(), text_tower=tower, embed_dim=16)
    assert clip.needs_captions and clip.text_model is clip
    assert isinstance(clip.build_collate(_augment(), None), ImageTextCollate)
