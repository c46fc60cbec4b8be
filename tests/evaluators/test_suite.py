"""run_evaluators: dispatch on the evaluator kinds of vfm.evaluators.protocols."""

from __future__ import annotations

import pytest
import torch
from hydra.utils import instantiate

from conftest import compose_cfg
from vfm.backbones import Backbone
from vfm.evaluators.protocols import FrozenFeatureEvaluator, ImageTextEvaluator, TrainsEncoderEvaluator
from vfm.evaluators.suite import run_evaluators, without_image_text


class Frozen(FrozenFeatureEvaluator):
    def __call__(self, features, num_classes):
        return {"frozen/n": features.train_x.shape[0], "frozen/k": num_classes}


class Text(ImageTextEvaluator):
    def __call__(self, features, num_classes, *, class_names, text_model):
        return {"text/names": len(class_names), "text/is_model": float(text_model is not None)}


class Trains(TrainsEncoderEvaluator):
    def __call__(self, encoder, splits, *, device=None, checkpoint_dir=None, distributed=True):
        self.seen = (device, checkpoint_dir, distributed)
        return {"trains/ok": 1}


@pytest.fixture(scope="module")
def setup():
    splits = instantiate(compose_cfg(["dataset=synthetic", "dataset.num_train=64", "dataset.num_val=16",
                                      "dataset.num_test=16"]).dataset)
    torch.manual_seed(0)
    encoder = Backbone("vit_tiny_patch16_224", img_size=28, patch_size=7, in_chans=1,
                       model_kwargs=dict(depth=1, embed_dim=16, num_heads=2))
    return encoder, splits


def test_each_kind_gets_its_own_call(setup, tmp_path):
    encoder, splits = setup
    trains = Trains()
    evs = {"frozen": Frozen(), "text": Text(), "ft": trains}
    out = run_evaluators(encoder, splits, evs, text_model=torch.nn.Linear(1, 1), work_dir=tmp_path,
                         prefix="p/", distributed=False, progress=False)
    assert out == {"p/frozen/n": 64.0, "p/frozen/k": float(splits.num_classes),
                   "p/text/names": float(len(splits.class_names)), "p/text/is_model": 1.0, "p/trains/ok": 1.0}
    assert trains.seen == ("cpu", tmp_path / "p/ft", False)


def test_image_text_needs_a_text_model_and_the_baseline_drops_it(setup):
    encoder, splits = setup
    evs = {"frozen": Frozen(), "text": Text()}
    with pytest.raises(ValueError, match="needs an image-text model"):
        run_evaluators(encoder, splits, evs, progress=False)
    assert list(without_image_text(evs)) == ["frozen"]


def test_an_undeclared_evaluator_is_rejected(setup):
    encoder, splits = setup
    with pytest.raises(TypeError, match="must subclass one of"):
        run_evaluators(encoder, splits, {"f": lambda feats, k: {}}, progress=False)
