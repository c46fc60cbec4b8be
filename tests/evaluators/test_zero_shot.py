"""Zero-shot on a toy image-text model whose embeddings are known."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from vfm.evaluators.features import SplitFeatures
from vfm.evaluators.zero_shot import ZeroShot, zero_shot_classifier


class ToyTextModel(nn.Module):
    """Text: the class word decides the direction (one-hot over 3 words), the template adds noise
    along a 4th axis. Image projection: identity (features are already embeddings)."""

    WORDS = ["cat", "dog", "bird"]

    def __init__(self):
        super().__init__()
        self.dummy = nn.Parameter(torch.zeros(1))

    def encode_text(self, texts):
        out = torch.zeros(len(texts), 4)
        for i, t in enumerate(texts):
            for j, w in enumerate(self.WORDS):
                if w in t:
                    out[i, j] = 1.0
            out[i, 3] = 0.5 if t.startswith("a photo") else -0.5
        return F.normalize(out, dim=-1)

    def project_image(self, features):
        return F.normalize(features, dim=-1)


def test_classifier_is_the_normalised_template_mean():
    model = ToyTextModel()
    w = zero_shot_classifier(model, ["cat", "dog"], ["a photo of a {}.", "an image of a {}."])
    # mean of (1, 0, 0, .5)/n and (1, 0, 0, -.5)/n is (1/n, 0, 0, 0) -> normalised: e_cat
    assert torch.allclose(w, torch.tensor([[1.0, 0, 0, 0], [0, 1.0, 0, 0]]), atol=1e-6)


def test_zero_shot_accuracy_on_known_embeddings():
    model = ToyTextModel()
    # test images: 3 cats, 2 dogs, 1 bird, embedded near their class axis; one dog is closer to bird
    x = torch.tensor([[1.0, 0.1, 0, 0], [0.9, 0, 0.2, 0], [1, 0, 0, 0], [0.1, 1, 0, 0], [0, 0.4, 0.9, 0], [0, 0, 1, 0]])
    y = torch.tensor([0, 0, 0, 1, 1, 2])
    feats = SplitFeatures(train_x=x, train_y=y, test_x=x, test_y=y)
    ev = ZeroShot(templates=["a photo of a {}.", "an image of a {}."], classes=[1, 2])
    out = ev(feats, 3, class_names=["cat", "dog", "bird"], text_model=model)
    assert out["zero_shot/top1"] == pytest.approx(100 * 5 / 6)
    assert out["zero_shot/top5"] == pytest.approx(100.0)  # k is capped at the 3 classes
    # dogs and birds only: 2 of 3 right, among all classes and among {dog, bird}
    assert out["zero_shot/subset_top1"] == pytest.approx(100 * 2 / 3)
    assert out["zero_shot/subset_only_top1"] == pytest.approx(100 * 2 / 3)
    # counted exactly (hits * 100 / n in float64), as kNN and the linear probe count
    assert out["zero_shot/top1"] == 5 * 100.0 / 6 and out["zero_shot/subset_top1"] == 2 * 100.0 / 3


def test_templates_need_a_slot():
    with pytest.raises(ValueError, match="'{}'"):
        ZeroShot(templates=["a photo"])



class ModeRecordingTextModel(ToyTextModel):
    """The toy model with a dropout text tower that records the mode it was called in."""

    def __init__(self):
        super().__init__()
        self.drop = nn.Dropout(p=0.5)
        self.seen_training: list[bool] = []

    def encode_text(self, texts):
        self.seen_training.append(self.drop.training)
        return self.drop(super().encode_text(texts))

    def project_image(self, features):
        self.seen_training.append(self.drop.training)
        return super().project_image(features)


def test_zero_shot_runs_the_text_tower_in_eval_mode_and_restores_training():
    """Mid-pretraining the model is in training mode: zero-shot must call its towers in eval mode
    (no dropout) and hand the model back in training mode."""
    x = torch.tensor([[1.0, 0.1, 0, 0], [0.1, 1, 0, 0], [0, 0, 1, 0]])
    y = torch.tensor([0, 1, 2])
    feats = SplitFeatures(train_x=x, train_y=y, test_x=x, test_y=y)
    model = ModeRecordingTextModel().train()
    out = ZeroShot(templates=["a photo of a {}."])(feats, 3, class_names=["cat", "dog", "bird"], text_model=model)
    assert out["zero_shot/top1"] == 100.0
    assert model.seen_training and not any(model.seen_training)
    assert model.training and model.drop.training
