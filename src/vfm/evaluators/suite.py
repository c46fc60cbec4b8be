"""Run a set of evaluators on one encoder: extract features once, then evaluate each by its kind
(`vfm.evaluators.protocols`)."""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from torch import Tensor, nn

from vfm.evaluators.dense_features import DenseInputs
from vfm.evaluators.features import GLOBAL, extract_split_recipes
from vfm.evaluators.protocols import (
    DenseEvaluator,
    Evaluator,
    FrozenFeatureEvaluator,
    ImageTextEvaluator,
    OptionalImageText,
    TrainsEncoderEvaluator,
)

log = logging.getLogger(__name__)

_KINDS = (FrozenFeatureEvaluator, ImageTextEvaluator, TrainsEncoderEvaluator, DenseEvaluator)


def check_evaluators(evaluators: Mapping[str, Any], *, has_text_model: bool) -> None:
    """Raise `TypeError` for an object that declares no evaluator kind, `ValueError` for an
    image-text evaluator without an image-text model to give it."""
    for name, ev in evaluators.items():
        if not isinstance(ev, _KINDS):
            kinds = ", ".join(k.__name__ for k in _KINDS)
            raise TypeError(f"evaluator {name} ({type(ev).__name__}) must subclass one of vfm.evaluators.protocols' {kinds}")
        if isinstance(ev, ImageTextEvaluator) and not has_text_model:
            raise ValueError(f"evaluator {name} needs an image-text model (a method=clip checkpoint); "
                             f"this encoder has no text tower")


def run_evaluators(
    encoder: nn.Module,
    splits: Any,
    evaluators: Mapping[str, Evaluator],
    *,
    device: str = "cpu",
    batch_size: int = 512,
    precision: str = "fp32",
    cache_path: str | Path | None = None,
    cache_key: str = "",
    prefix: str = "",
    progress: bool = True,
    text_model: nn.Module | None = None,
    work_dir: str | Path | None = None,
    distributed: bool = True,
    on_figure: Callable[[str, Tensor], None] | None = None,
) -> dict[str, float]:
    """Return {prefix + metric: value} from every evaluator in `evaluators` (name -> evaluator).

    Frozen-feature and image-text evaluators share one extraction of the encoder's features, one
    set per recipe they name (cached in `cache_path` under `cache_key`, other recipes beside it);
    image-text ones also get the class names and `text_model`; a frozen-feature evaluator with an
    optional image-text part (`OptionalImageText`: retrieval) also runs it when there is a
    `text_model` and the splits caption their test images (`splits.test_captions`), and reports
    only its image metrics otherwise. Evaluators that train the encoder
    get `checkpoint_dir = work_dir / (prefix + name)` (e.g. `<run>/finetune`,
    `<run>/eval/baseline/finetune`) when `work_dir` is given, so running the same evaluation again
    resumes them. Dense evaluators (segmentation, attention
    Jaccard) run the encoder on the masked splits themselves and save their figures under the same
    `work_dir / (prefix + name)`; `on_figure(prefix + tag, [3, H, W] image)` receives each figure
    (e.g. to log it to TensorBoard). `distributed=False`: only this process
    evaluates (pretrain evaluates on rank 0), so they must not use the process group; with the
    default, under torchrun every process must call this.
    """
    if not evaluators:
        return {}
    check_evaluators(evaluators, has_text_model=text_model is not None)
    # each frozen-feature evaluator names the features it reads (kNN the global one, the linear
    # probe its paper's recipe); all of them come out of one pass over the data
    recipes = {name: ev.feature_recipe(encoder) if isinstance(ev, FrozenFeatureEvaluator) else GLOBAL
               for name, ev in evaluators.items() if isinstance(ev, (FrozenFeatureEvaluator, ImageTextEvaluator))}
    feats = {}
    if recipes:
        feats = extract_split_recipes(
            encoder, splits, tuple(dict.fromkeys(recipes.values())), cache_path=cache_path, cache_key=cache_key,
            batch_size=batch_size, device=device, precision=precision, progress=progress,
        )
    metrics: dict[str, float] = {}
    for name, evaluator in evaluators.items():
        if isinstance(evaluator, DenseEvaluator):
            inputs = DenseInputs(splits.mean, splits.std, device, precision, batch_size, progress)
            out = evaluator(encoder, splits, inputs=inputs,
                            out_dir=Path(work_dir) / f"{prefix}{name}" if work_dir is not None else None)
            for tag, image in evaluator.figures.items() if on_figure is not None else ():
                on_figure(f"{prefix}{tag}", image)
        elif isinstance(evaluator, TrainsEncoderEvaluator):
            checkpoint_dir = Path(work_dir) / f"{prefix}{name}" if work_dir is not None else None
            out = evaluator(encoder, splits, device=device, checkpoint_dir=checkpoint_dir, distributed=distributed)
        elif isinstance(evaluator, ImageTextEvaluator):
            assert text_model is not None  # check_evaluators
            out = evaluator(feats[recipes[name]], splits.num_classes, class_names=splits.class_names, text_model=text_model)
        else:
            out = evaluator(feats[recipes[name]], splits.num_classes)
            captions = getattr(splits, "test_captions", None)  # duck-typed splits may not have the field
            if isinstance(evaluator, OptionalImageText) and text_model is not None and captions is not None:
                out = {**out, **evaluator.image_text(feats[recipes[name]], test_captions=captions, text_model=text_model)}
        metrics.update({f"{prefix}{k}": float(v) for k, v in out.items()})
    return metrics


def without_image_text(evaluators: Mapping[str, Evaluator]) -> dict[str, Evaluator]:
    """The evaluators a plain image encoder can be given (a random-init baseline has no text tower)."""
    return {k: v for k, v in evaluators.items() if not isinstance(v, ImageTextEvaluator)}
