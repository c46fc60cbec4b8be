"""Image<->text recall@k of the retrieval evaluator, on embeddings with a known answer."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from conftest import TINY, compose_cfg
from vfm import evaluate, pretrain
from vfm.config import ConfigError, validate_pretrain
from vfm.evaluators.features import SplitFeatures
from vfm.evaluators.retrieval import Retrieval, image_text_recall, sample_pairs


def _angles(degrees: list[float]) -> torch.Tensor:
    rad = torch.tensor(degrees) * math.pi / 180
    return torch.stack([rad.cos(), rad.sin()], dim=1)


def test_identical_embeddings_give_recall_100() -> None:
    emb = torch.randn(50, 16, generator=torch.Generator().manual_seed(0))
    out = image_text_recall(emb, emb, torch.arange(50), ks=(1, 5))
    assert out == {"i2t_r1": 100.0, "i2t_r5": 100.0, "t2i_r1": 100.0, "t2i_r5": 100.0}


def test_a_known_permutation_gives_the_hand_computed_recall() -> None:
    # images at 0, 90, 180, 270 degrees; text j at image j's angle + 10 degrees. Image i's caption is
    # text [0, 2, 1, 3][i]. From image 1 (90): texts at 10, 80, 100, 170 degrees are 1, 0, 2, 3, so
    # its text 2 is third; image 2 (180): 2, 1, 3, 0, its text 1 second; images 0 and 3 first.
    images, texts = _angles([0, 90, 180, 270]), _angles([10, 100, 190, 280])
    pairing = torch.tensor([0, 2, 1, 3])
    out = image_text_recall(images, texts, pairing, ks=(1, 2, 3))
    assert (out["i2t_r1"], out["i2t_r2"], out["i2t_r3"]) == (50.0, 75.0, 100.0)
    # text 2 (190) ranks images 2, 3, 1, 0: its image 1 third; text 1 (100): 1, 2, 0, 3: its image 2 second
    assert (out["t2i_r1"], out["t2i_r2"], out["t2i_r3"]) == (50.0, 75.0, 100.0)


def test_random_embeddings_give_k_over_n() -> None:
    g = torch.Generator().manual_seed(0)
    n = 500
    out = image_text_recall(torch.randn(n, 32, generator=g), torch.randn(n, 32, generator=g), torch.arange(n),
                            ks=(10, 50, 100))
    for k in (10, 50, 100):  # a uniform rank: k/N = 2%, 10%, 20% (binomial std <= 1.8 points)
        assert out[f"i2t_r{k}"] == pytest.approx(100 * k / n, abs=6.0)
        assert out[f"t2i_r{k}"] == pytest.approx(100 * k / n, abs=6.0)


def test_ties_count_against_the_query() -> None:
    # a collapsed model: every embedding the same. An optimistic tie rule would give 100.
    ones = torch.ones(6, 4)
    out = image_text_recall(ones, ones[:3], torch.tensor([0, 0, 1, 1, 2, 2]), ks=(1, 3))
    assert out["i2t_r1"] == 0.0 and out["t2i_r1"] == 0.0
    assert out["i2t_r3"] == 100.0  # 3 texts: any image's caption is in its top 3
    nan = image_text_recall(torch.full((2, 4), float("nan")), torch.eye(2, 4), torch.tensor([0, 1]), ks=(1,))
    assert nan == {"i2t_r1": 0.0, "t2i_r1": 0.0}  # a diverged model is never right by accident


class WordModel(nn.Module):
    """Text: one axis per word (cat, dog, bird). Images: their features, normalised."""

    WORDS = ["cat", "dog", "bird"]

    def __init__(self) -> None:
        super().__init__()
        self.dummy = nn.Parameter(torch.zeros(1))
        self.texts_seen: list[str] = []

    def encode_text(self, texts: list[str]) -> torch.Tensor:
        self.texts_seen += texts
        return torch.stack([F.one_hot(torch.tensor(next(j for j, w in enumerate(self.WORDS) if w in t)), 3).float()
                            for t in texts])

    def project_image(self, features: torch.Tensor) -> torch.Tensor:
        return F.normalize(features, dim=-1)


def test_duplicate_captions_are_one_text() -> None:
    captions = ["a cat", "a cat", "a cat", "a dog", "a dog", "a bird"]
    # the third cat looks like a dog, and more so than either dog (cos .995 vs .981 to the dog axis)
    x = torch.tensor([[1.0, 0, 0], [1, 0.1, 0], [0.1, 1, 0], [0, 1, 0.2], [0, 1, 0.2], [0, 0, 1]])
    feats = SplitFeatures(x, torch.zeros(6, dtype=torch.long), test_x=x, test_y=torch.zeros(6, dtype=torch.long))
    model = WordModel()
    out = Retrieval(image_text_ks=(1, 2)).image_text(feats, test_captions=captions, text_model=model)
    assert model.texts_seen == ["a cat", "a dog", "a bird"]  # each distinct caption embedded once
    # i2t over the 3 distinct texts: the dog-like cat finds "a dog" first, its own second
    assert out["retrieval/i2t_r1"] == pytest.approx(100 * 5 / 6) and out["retrieval/i2t_r2"] == 100.0
    # t2i: "a cat" (3 pairs) finds a cat first; "a dog" (2 pairs) the dog-like cat, a dog second;
    # "a bird" (1 pair) the bird
    assert out["retrieval/t2i_r1"] == pytest.approx(100 * 4 / 6) and out["retrieval/t2i_r2"] == 100.0


def test_pairs_are_capped_with_a_seed() -> None:
    a, b = sample_pairs(100, 10, seed=3), sample_pairs(100, 10, seed=3)
    assert torch.equal(a, b) and len(a) == 10 and len(set(a.tolist())) == 10
    assert not torch.equal(a, sample_pairs(100, 10, seed=4))
    assert torch.equal(sample_pairs(5, 10, seed=0), torch.arange(5)) and len(sample_pairs(100, None, 0)) == 100


def test_bad_settings_and_captions_are_refused() -> None:
    with pytest.raises(ValueError, match="max_pairs"):
        Retrieval(max_pairs=0)
    with pytest.raises(ValueError, match="image_text_ks"):
        Retrieval(image_text_ks=[0])
    x = torch.eye(3)
    feats = SplitFeatures(x, torch.zeros(3, dtype=torch.long), test_x=x, test_y=torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="one caption per test image"):
        Retrieval().image_text(feats, test_captions=["a cat"], text_model=WordModel())


@pytest.mark.parametrize("override", ["max_pairs=0", "image_text_ks=[1,0]"])
def test_bad_config_values_name_the_key_before_any_compute(override: str) -> None:
    key = f"evaluator.retrieval.{override.split('=')[0]}"
    with pytest.raises(ConfigError) as info:
        validate_pretrain(compose_cfg(TINY + ["evaluator=[retrieval]", f"evaluator.retrieval.{override}"]))
    assert "\n" not in str(info.value) and str(info.value).startswith(f"{key}=") and f"set {key} to" in str(info.value)


def test_clip_run_reports_image_text_recall_and_the_baseline_does_not(tiny_method_cfg, tmp_path: Path) -> None:
    """pretrain a tiny CLIP with the retrieval evaluator: its metrics have image<->text recall, the
    random-init baseline (no text tower) only the image metrics; `evaluate` on the run agrees."""
    cfg = tiny_method_cfg("clip", "trainer.max_steps=2", "evaluator=[retrieval]", "trainer.precision=fp32",
                          "evaluator.retrieval.max_pairs=300")
    metrics = pretrain.run(cfg)
    for key in ("retrieval/i2t_r1", "retrieval/i2t_r10", "retrieval/t2i_r5", "retrieval/map"):
        assert 0.0 <= metrics[key] <= 100.0, key
    assert "baseline/retrieval/map" in metrics and not any("i2t" in k or "t2i" in k for k in metrics if "baseline" in k)
    common = ["dataset=synthetic_captions", "trainer.progress=false", "trainer.device=cpu", "logger=none",
              "trainer.precision=fp32", "evaluator=[retrieval]", "evaluator.retrieval.max_pairs=300",
              "backbone.patch_size=7", "+backbone.model_kwargs={depth: 2, embed_dim: 32, num_heads: 2}"]
    out = evaluate.run(compose_cfg(common + [f"checkpoint={cfg.paths.output_dir}"], tmp_path / "e", "evaluate"))
    assert out["retrieval/i2t_r1"] == pytest.approx(metrics["retrieval/i2t_r1"], abs=1e-6)
    assert out["retrieval/t2i_r10"] == pytest.approx(metrics["retrieval/t2i_r10"], abs=1e-6)
    # an image-only checkpoint: the image metrics, no error
    random = evaluate.run(compose_cfg(common + ["checkpoint=random"], tmp_path / "r", "evaluate"))
    assert "retrieval/map" in random and "retrieval/i2t_r1" not in random
