"""The kinds of evaluator, one small base class each; an evaluator declares its kind by subclassing.

`vfm.evaluators.suite.run_evaluators` dispatches on the kind (`isinstance`), so an evaluator's
call signature is a contract stated here, not discovered at run time:

- `FrozenFeatureEvaluator` (kNN, linear probe, retrieval): `(features, num_classes)`. The encoder's
  features of every split are extracted once and shared by all of them.
- `OptionalImageText`, mixed into a frozen-feature evaluator (retrieval): when the encoder comes
  with an image-text model and the dataset captions its test split (`DataSplits.test_captions`),
  `image_text(features, test_captions=, text_model=)` adds image-text metrics to those of
  `__call__`; otherwise they are simply absent (an image-only checkpoint is no error).
- `ImageTextEvaluator` (zero-shot): the same features plus the dataset's class names and the
  image-text model (`encode_text`, `project_image`) of an image-text method such as CLIP. A
  random-initialisation baseline has no text tower, so these are left out of it.
- `TrainsEncoderEvaluator` (fine-tuning): `(encoder, splits, device=, checkpoint_dir=,
  distributed=)`; it trains a copy of the encoder, keeps resumable state in `checkpoint_dir` and,
  with `distributed=False`, must not use the process group (pretraining evaluates on rank 0 alone).
- `DenseEvaluator` (linear segmentation, attention Jaccard): `(encoder, splits, inputs=, out_dir=)`;
  `splits` carry per-pixel masks (`vfm.data.datasets.segmentation.SegmentationSplits`), `inputs`
  says how to run the frozen encoder (`DenseInputs`: mean/std, device, precision, batch size).
  It uses no collective (every process that calls it computes the same numbers), writes its
  figures under `out_dir` when given and leaves them in `figures` ({tag: [3, H, W] image}).

Every evaluator returns `{metric name: value}` (accuracies in percent).
"""

from __future__ import annotations

import contextlib
from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from torch import nn

if TYPE_CHECKING:
    from torch import Tensor

    from vfm.evaluators.dense_features import DenseInputs
    from vfm.evaluators.features import SplitFeatures

__all__ = [
    "DenseEvaluator", "Evaluator", "FrozenFeatureEvaluator", "ImageTextEvaluator", "OptionalImageText",
    "TrainsEncoderEvaluator",
]


class FrozenFeatureEvaluator(ABC):
    """Evaluates frozen features (extracted once per encoder and recipe, shared)."""

    def feature_recipe(self, encoder: nn.Module) -> str:
        """Which features of `encoder` it evaluates (`vfm.evaluators.recipes`): the global one
        unless it says otherwise (the linear probe's paper recipes)."""
        return "global"

    @abstractmethod
    def __call__(self, features: SplitFeatures, num_classes: int) -> dict[str, float]:
        """features: `[N, D]` train/val/test features and int64 `[N]` labels (val/test may be None)."""


class ImageTextEvaluator(ABC):
    """Evaluates frozen image features against text embeddings of the class names."""

    @abstractmethod
    def __call__(self, features: SplitFeatures, num_classes: int, *, class_names: Sequence[str],
                 text_model: nn.Module) -> dict[str, float]:
        """text_model: `encode_text(list[str]) -> [T, E]`, `project_image([N, D]) -> [N, E]`."""


class OptionalImageText(ABC):
    """Mixed into a `FrozenFeatureEvaluator` whose protocol has an image-text part: run only when
    there is a text model and the test split has a caption per image."""

    @abstractmethod
    def image_text(self, features: SplitFeatures, *, test_captions: Sequence[str],
                   text_model: nn.Module) -> dict[str, float]:
        """features: the same the evaluator's `__call__` got; test_captions: the caption of each
        test item, in order; text_model as for `ImageTextEvaluator`."""


class TrainsEncoderEvaluator(ABC):
    """Trains (a copy of) the encoder itself on the labelled splits."""

    @abstractmethod
    def __call__(self, encoder: nn.Module, splits: Any, *, device: str | None = None,
                 checkpoint_dir: str | Path | None = None, distributed: bool = True) -> dict[str, float]:
        """splits: a `vfm.data` `DataSplits`; checkpoint_dir: where a rerun resumes from."""


class DenseEvaluator(ABC):
    """Evaluates the frozen encoder's per-patch outputs against per-pixel masks."""

    figures: dict[str, Tensor]

    @abstractmethod
    def __call__(self, encoder: nn.Module, splits: Any, *, inputs: DenseInputs,
                 out_dir: str | Path | None = None) -> dict[str, float]:
        """splits: a `SegmentationSplits`; out_dir: where figures are saved (None: not saved)."""


Evaluator = FrozenFeatureEvaluator | ImageTextEvaluator | TrainsEncoderEvaluator | DenseEvaluator


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """`model` in eval mode for the block, each module's flag restored after it: an image-text
    evaluator runs mid-pretraining too, where a trainable text tower must not apply dropout."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for module, training in modes:
            module.training = training
