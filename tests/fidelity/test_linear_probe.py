"""The papers' frozen-feature protocols against their official code: DINO's linear-probe input
(facebookresearch/dino eval_linear.py), the composed paper configs' recipes (DINO / iBOT ViT-S and
ViT-B, DINOv2's grid, MAE's [CLS] + BatchNorm without affine), DINO's kNN settings, and
`evaluate` on a saved checkpoint choosing the recipe of the method that wrote it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate

from conftest import TINY, compose_cfg
from vfm import evaluate, pretrain
from vfm.backbones import Backbone
from vfm.evaluators.features import last_blocks
from vfm.evaluators.linear import paper_features
from vfm.evaluators.recipes import recipe_features

WIDTH = {"vit_small": 384, "vit_base": 768}  # timm vit_small_patch16_224 / vit_base_patch16_224


def _dino_linear_input(blocks: list[torch.Tensor], avgpool: bool) -> torch.Tensor:
    """eval_linear.py's train(), written out: [CLS] of each of the last n normed block outputs,
    concatenated; with avgpool, stacked with the last block's patch mean on a new last axis and
    flattened (which interleaves the two)."""
    output = torch.cat([x[:, 0] for x in blocks], dim=-1)
    if avgpool:
        output = torch.cat((output.unsqueeze(-1), torch.mean(blocks[-1][:, 1:], dim=1).unsqueeze(-1)), dim=-1)
        output = output.reshape(output.shape[0], -1)
    return output


@pytest.mark.parametrize(("recipe", "n", "avgpool"), [("last4_cls", 4, False), ("cls_avgpool", 1, True)])
def test_dino_eval_linear_input(recipe: str, n: int, avgpool: bool) -> None:
    """Ours equals DINO's linear-probe input up to the column order (DINO interleaves [CLS] and the
    patch mean; a linear head on per-dimension normalised features cannot tell)."""
    torch.manual_seed(0)
    vit = Backbone("vit_tiny_patch16_224", img_size=8, patch_size=4, in_chans=1,
                   model_kwargs=dict(depth=5, embed_dim=16, num_heads=2)).eval()
    x = torch.randn(3, 1, 8, 8)
    with torch.no_grad():
        _, blocks = last_blocks(vit, x, n)
        ours = recipe_features(blocks, recipe)
        theirs = _dino_linear_input([torch.cat([p, t], 1) for p, t in blocks], avgpool)
    perm = torch.arange(ours.shape[1]).reshape(-1, 16).T.reshape(-1) if avgpool else torch.arange(ours.shape[1])
    torch.testing.assert_close(ours[:, perm], theirs)


@pytest.mark.parametrize(("method", "backbone", "features", "norm"), [
    ("dino", "vit_small", "last4_cls", "standardize"),    # eval_linear.py --n_last_blocks 4
    ("dino", "vit_base", "cls_avgpool", "standardize"),   # --n_last_blocks 1 --avgpool_patchtokens true
    ("ibot", "vit_small", "last4_cls", "standardize"),    # run.sh: small -> 4 blocks, avgpool 0
    ("ibot", "vit_base", "cls_avgpool", "standardize"),   # else -> 1 block, avgpool 2
    ("dinov2", "vit_base", "grid", "standardize"),        # eval/linear.py: [1, 4] x [False, True]
    ("mae", "vit_base", "cls", "batchnorm"),              # main_linprobe.py --cls_token, BatchNorm1d(affine=False)
    ("supervised", "vit_small", "global", "standardize"),  # no paper protocol: the encoder's own feature
])
def test_paper_config_recipe(method: str, backbone: str, features: str, norm: str) -> None:
    cfg = compose_cfg([f"method={method}", f"backbone={backbone}", "~recipe"])
    probe = instantiate(cfg.evaluator.linear)
    assert paper_features(probe.paper, WIDTH[backbone]) == features
    assert probe.norm == norm and probe.features == "auto"


def test_dino_knn_settings() -> None:
    """eval_knn.py: k=20 (of --nb_knn 10 20 100 200), T=0.07, on the final [CLS] (model(x))."""
    knn = instantiate(compose_cfg([]).evaluator.knn)
    assert (knn.k, knn.temperature) == (20, 0.07)
    assert knn.feature_recipe(None) == "global"


def test_evaluate_follows_the_method_of_the_checkpoint(tmp_path: Path) -> None:
    """`evaluate` on a saved DINO checkpoint: the run's config says method.linear_probe=dino, so
    features=auto reads the last 4 blocks' [CLS]; DINOv2's grid with MAE's BatchNorm and LARS runs
    end to end too, and each recipe is cached in its own file."""
    deep = [o if not o.startswith("+backbone.model_kwargs") else "+backbone.model_kwargs={depth: 4, embed_dim: 32, num_heads: 2}"
            for o in TINY]
    cfg = compose_cfg(deep + ["trainer.max_epochs=1", "trainer.max_steps=1", "eval.baseline=false", "evaluator=[]", "logger=none",
                              "dataset.num_train=128", "dataset.num_val=32", "dataset.num_test=32"], tmp_path / "run")
    pretrain.run(cfg)
    common = ["dataset=synthetic", "dataset.num_train=128", "dataset.num_val=32", "dataset.num_test=32",
              "trainer.progress=false", "trainer.device=cpu", "logger=none", "evaluator=[linear]",
              "evaluator.linear.epochs=2", f"checkpoint={tmp_path / 'run' / 'checkpoints' / 'last.pt'}"]
    m = evaluate.run(compose_cfg(common, tmp_path / "e", "evaluate"))
    assert (m["linear/n_last_blocks"], m["linear/avgpool"]) == (4, 0)
    assert json.loads((tmp_path / "e" / "metrics.json").read_text())["metrics"]["linear/n_last_blocks"] == 4
    m = evaluate.run(compose_cfg(common + ["evaluator.linear.features=grid", "evaluator.linear.norm=batchnorm",
                                           "evaluator.linear.optimizer=lars"], tmp_path / "e", "evaluate"))
    assert m["linear/n_last_blocks"] in (1, 4) and 0 <= m["linear/top1"] <= 100
    cached = sorted(p.name.split(".", 1)[1] for p in (tmp_path / "e" / "features").iterdir())
    assert cached == ["last4_cls.pt", "last4_cls_avgpool.pt"]
