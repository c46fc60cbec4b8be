"""Supervised pretraining: soft targets from Mixup/CutMix + label smoothing, reproducible collate."""

import pytest
import torch

from vfm.backbones import Backbone
from vfm.data.collate import SupervisedCollate
from vfm.data.transforms import MultiCropAugmentation
from vfm.methods.supervised import Supervised


def _augment():
    return MultiCropAugmentation(global_crop_size=16, local_crop_size=16, n_global=1, n_local=0, mean=[0.5], std=[0.25],
                                 color_jitter_p=0.0, grayscale_p=0.0, blur_p=(0, 0, 0), solarize_p=(0, 0, 0))


def _samples(n=8, seed=7):
    g = torch.Generator().manual_seed(0)
    return [(torch.randint(0, 256, (1, 16, 16), dtype=torch.uint8, generator=g), i % 4, seed) for i in range(n)]


def test_label_smoothing_without_mixup():
    c = SupervisedCollate(_augment(), num_classes=4, label_smoothing=0.1, mixup=0.0, cutmix=0.0, randaugment=None)
    out = c(_samples())
    t = out["target"]
    assert torch.allclose(t.sum(1), torch.ones(8))
    assert torch.allclose(t[0], torch.tensor([0.925, 0.025, 0.025, 0.025]))


def test_mixup_targets_and_reproducibility():
    c = SupervisedCollate(_augment(), num_classes=4, label_smoothing=0.1, randaugment="rand-m9-mstd0.5-inc1-mmax9")
    a, b = c(_samples()), c(_samples())
    assert torch.equal(a["crops"][0], b["crops"][0]) and torch.equal(a["target"], b["target"])
    assert torch.allclose(a["target"].sum(1), torch.ones(8))
    assert (a["target"] > 0.03).sum(1).ge(1).all()
    other = c(_samples(seed=8))
    assert not torch.equal(a["crops"][0], other["crops"][0])
    # the training process's own random streams are untouched
    import random

    state = random.getstate()
    c(_samples())
    assert random.getstate() == state


def test_supervised_loss_is_soft_cross_entropy():
    torch.manual_seed(0)
    bb = Backbone("vit_tiny_patch16_224", img_size=16, patch_size=4, in_chans=1,
                  model_kwargs=dict(depth=1, embed_dim=16, num_heads=2))
    m = Supervised(bb, num_classes=4)
    x = torch.randn(3, 1, 16, 16)
    target = torch.tensor([[1.0, 0, 0, 0], [0.5, 0.5, 0, 0], [0, 0, 0.2, 0.8]])
    out = m.training_step({"crops": [x], "target": target, "label": torch.tensor([0, 1, 3])}, 0, {})
    logp = torch.log_softmax(m.head(bb(x)), -1)
    assert out["loss"].item() == pytest.approx(-(target * logp).sum(1).mean().item(), rel=1e-5)
    with pytest.raises(ValueError, match="num_classes"):
        Supervised(bb, num_classes=0)
