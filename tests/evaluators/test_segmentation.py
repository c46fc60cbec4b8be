"""Linear segmentation: known answers (mask-encoding features -> mIoU 1, random features -> chance),
mIoU arithmetic, the end-to-end evaluator on a tiny ViT, the suite's dense kind, the datasets."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from vfm.backbones import Backbone
from vfm.data.datasets.core import DataSplits, TensorImageDataset
from vfm.data.datasets.segmentation import (
    IGNORE_INDEX,
    foreground_masks,
    segmentation_folder,
    synthetic_shapes,
)
from vfm.evaluators.segmentation import (
    LinearSegmentation,
    SegmentationHeads,
    confusion_matrices,
    fit_segmentation_heads,
    iou_per_class,
)
from vfm.evaluators.suite import run_evaluators

CONF = Path(__file__).resolve().parents[2] / "conf"
FIT = {"lrs": (1e-3, 1e-2, 1e-1), "epochs": 5, "batch_size": 32, "weight_decay": 0.0}


def patch_masks(n: int, classes: int, seed: int, size: int = 4) -> torch.Tensor:
    return torch.randint(0, classes, (n, size, size), generator=torch.Generator().manual_seed(seed)).to(torch.uint8)


def miou(heads, tokens, masks, classes, head=None) -> torch.Tensor:
    return iou_per_class(confusion_matrices(heads, tokens, masks, classes, heads_idx=head)).nanmean(-1)


def test_mask_encoding_features_give_miou_one() -> None:
    """Tokens = one-hot of their patch's class (+ noise), masks at the patch resolution: every head
    that trained at all segments perfectly."""
    classes = 4
    g = torch.Generator().manual_seed(0)
    masks = patch_masks(128, classes, 1)
    masks[0, 0, 0] = IGNORE_INDEX  # ignored pixels are neither trained on nor scored
    onehot = torch.nn.functional.one_hot(masks.long().clamp(max=classes - 1), classes).float()
    tokens = (onehot * 3 + 0.1 * torch.randn(*onehot.shape, generator=g)).half()
    heads = fit_segmentation_heads(tokens, masks, classes, **FIT)
    assert float(miou(heads, tokens, masks, classes).max()) == pytest.approx(1.0)


def test_random_features_give_chance() -> None:
    """Features independent of uniformly random masks: no head beats guessing (mIoU of a constant
    prediction 1/C^2 = 0.0625, of uniform guessing 1/(2C-1) = 0.14)."""
    classes = 4
    g = torch.Generator().manual_seed(0)
    train_m, test_m = patch_masks(256, classes, 1), patch_masks(256, classes, 2)
    heads = fit_segmentation_heads(torch.randn(256, 4, 4, 8, generator=g).half(), train_m, classes, **FIT)
    scores = miou(heads, torch.randn(256, 4, 4, 8, generator=g).half(), test_m, classes)
    assert float(scores.max()) < 0.2


def test_micro_batches_bound_the_logits_and_change_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    """Logits of at most ``max_logit_elements`` per forward pass (blocks of images, and of heads when
    one image's logits of every head exceed it), and the same heads and confusion as in one pass:
    gradients accumulate over the blocks of a mini-batch, normalised by its valid pixels."""
    classes, g = 3, torch.Generator().manual_seed(0)
    tokens = torch.randn(10, 2, 2, 8, generator=g).half()
    masks = torch.randint(0, classes, (10, 8, 8), generator=g).to(torch.uint8)  # logits upsampled 4x
    masks[0, :5] = IGNORE_INDEX  # images with unequal numbers of valid pixels
    fit = {**FIT, "epochs": 2, "batch_size": 4}
    whole = fit_segmentation_heads(tokens, masks, classes, **fit, max_logit_elements=10**9)
    conf = confusion_matrices(whole, tokens, masks, classes, max_logit_elements=10**9)
    sizes: list[int] = []
    forward = SegmentationHeads.forward

    def recording(self, *args, **kwargs):
        logits = forward(self, *args, **kwargs)
        sizes.append(logits.numel())
        return logits

    monkeypatch.setattr(SegmentationHeads, "forward", recording)
    one_map = classes * 8 * 8
    for budget in (2 * one_map, 3 * 2 * one_map):  # 2 of the 3 heads of one image; all heads of 2 images
        sizes.clear()
        parts = fit_segmentation_heads(tokens, masks, classes, **fit, max_logit_elements=budget)
        assert max(sizes) <= budget
        for a, b in zip(whole.parameters(), parts.parameters(), strict=True):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
        sizes.clear()
        assert torch.equal(confusion_matrices(whole, tokens, masks, classes, max_logit_elements=budget), conf)
        assert max(sizes) <= budget


def test_iou_per_class_arithmetic() -> None:
    conf = torch.tensor([[3, 1, 0], [0, 2, 0], [0, 0, 0]])  # rows: truth, columns: prediction
    iou = iou_per_class(conf)
    assert iou[0] == pytest.approx(3 / 4) and iou[1] == pytest.approx(2 / 3)
    assert torch.isnan(iou[2])  # class absent from truth and prediction: left out of the mean


def tiny_vit(img_size: int = 32, in_chans: int = 3) -> Backbone:
    torch.manual_seed(0)
    return Backbone("vit_tiny_patch16_224", img_size=img_size, patch_size=8, in_chans=in_chans,
                    model_kwargs={"depth": 1, "embed_dim": 32, "num_heads": 2})


def test_evaluator_end_to_end(tmp_path: Path) -> None:
    splits = synthetic_shapes(n_train=48, n_val=16, n_test=16)
    figures: dict[str, torch.Tensor] = {}
    ev = {"segmentation": LinearSegmentation(lrs=(1e-2,), epochs=2, batch_size=16, n_show=4)}
    m = run_evaluators(tiny_vit(), splits, ev, batch_size=16, progress=False, work_dir=tmp_path,
                       prefix="baseline/", on_figure=figures.__setitem__)
    assert {"baseline/segmentation/miou", "baseline/segmentation/val_miou", "baseline/segmentation/pixel_acc",
            "baseline/segmentation/best_lr", "baseline/segmentation/iou/background"} <= set(m)
    grid = figures["baseline/segmentation/predictions"]
    assert grid.shape[0] == 3 and grid.shape[1] > 3 * 32  # image / truth / prediction rows
    assert (tmp_path / "baseline" / "segmentation" / "predictions.png").is_file()


def test_without_masks_a_clear_error() -> None:
    data = TensorImageDataset(torch.zeros(4, 3, 32, 32, dtype=torch.uint8), torch.zeros(4, dtype=torch.int64))
    splits = DataSplits(data, data, data, 32, 3, (0.5,) * 3, (0.5,) * 3, 1)
    with pytest.raises(ValueError, match="dataset=fashion_mnist_segmentation"):
        run_evaluators(tiny_vit(), splits, {"segmentation": LinearSegmentation()}, progress=False)


def test_config_instantiates() -> None:
    ev = instantiate(OmegaConf.load(CONF / "evaluator" / "segmentation.yaml"))
    assert isinstance(ev, LinearSegmentation) and ev.lrs == (1e-3, 3e-3, 1e-2, 3e-2, 0.1)


def test_foreground_masks() -> None:
    images = torch.tensor([[[[0, 30], [26, 25]]], [[[200, 0], [0, 0]]]], dtype=torch.uint8)
    masks = foreground_masks(images, torch.tensor([3, 0]), threshold=25)
    assert masks.tolist() == [[[0, 4], [4, 0]], [[1, 0], [0, 0]]]


def _png(path: Path, array: np.ndarray, mode: str) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array, mode=mode).save(path)


def test_segmentation_folder_ade_layout(tmp_path: Path) -> None:
    """ADE20k's layout and label convention: 0 ("other") -> 255, k -> k - 1; masks resized by nearest."""
    for split in ("training", "validation"):
        for i in range(3):
            _png(tmp_path / "images" / split / f"im{i}.jpg", np.full((20, 30, 3), 100 + i, np.uint8), "RGB")
            mask = np.zeros((20, 30), np.uint8)
            mask[:, 15:] = 2
            _png(tmp_path / "annotations" / split / f"im{i}.png", mask, "L")
    splits = segmentation_folder(root=str(tmp_path), classes="ade20k", image_dir="images/{split}",
                                 mask_dir="annotations/{split}", train_split="training", test_split="validation",
                                 reduce_zero_label=True, val_fraction=0.34, img_size=16)
    assert (len(splits.train), len(splits.val), len(splits.test)) == (2, 1, 3)
    assert len(splits.mask_classes) == 150
    image, mask = splits.test.pair(0)
    assert image.shape == (3, 16, 16) and mask.shape == (16, 16) and mask.dtype == torch.uint8
    assert set(mask.unique().tolist()) == {1, IGNORE_INDEX}
    assert splits.test[0][1] == -1  # no image-level label


def test_reduce_zero_label_keeps_ignored_pixels_ignored(tmp_path: Path) -> None:
    """mmsegmentation's reduce_zero_label: 0 -> 255 (ignored), k -> k - 1, and 255 stays 255."""
    from vfm.data.datasets.segmentation import load_mask

    _png(tmp_path / "m.png", np.array([[0, 1], [151, 255]], np.uint8), "L")
    assert load_mask(tmp_path / "m.png", size=2, reduce_zero_label=True).tolist() == [[255, 0], [150, 255]]
    assert load_mask(tmp_path / "m.png", size=2, reduce_zero_label=False).tolist() == [[0, 1], [151, 255]]


def test_pretrain_evaluates_periodically_and_logs_the_figure(tiny_cfg, tmp_path: Path) -> None:
    from vfm.pretrain import run

    cfg = tiny_cfg("dataset=synthetic_shapes", "evaluator=[segmentation,attention_jaccard]", "eval.every_n_epochs=1",
                   "eval.periodic=[segmentation,attention_jaccard]", "eval.baseline=false",
                   "evaluator.segmentation.epochs=1", run_dir=tmp_path / "run")
    metrics = run(cfg)
    # after training, the test split: mIoU and the Jaccard of the head chosen on val
    assert {"segmentation/miou", "attention_jaccard/best_head", "attention_jaccard/single_head"} <= set(metrics)
    assert (tmp_path / "run" / "eval" / "segmentation" / "predictions.png").is_file()
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tags = EventAccumulator(str(tmp_path / "run" / "tb")).Reload().Tags()["images"]
    assert {"eval/segmentation/predictions", "final/segmentation/predictions"} <= set(tags)
    # during training on val only: the Jaccard of the val split is named so, no test mIoU
    during = json.loads((tmp_path / "run" / "curves.json").read_text())[0]["metrics"]
    assert {"segmentation/val_miou", "attention_jaccard/val_best_head"} <= set(during)
    assert not {"segmentation/miou", "attention_jaccard/best_head"} & set(during)


def test_encoder_without_patch_tokens_is_refused() -> None:
    conv = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 8, 8), torch.nn.Flatten())
    with pytest.raises(ValueError, match="segmentation.* needs a ViT with patch tokens"):
        run_evaluators(conv, synthetic_shapes(n_train=4, n_val=4, n_test=4), {"segmentation": LinearSegmentation()},
                       progress=False)
