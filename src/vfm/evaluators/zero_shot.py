"""Zero-shot classification with an image–text model (Radford et al. 2021, CLIP, Sec. 3.1.4 and
its prompt-engineering notebook; open_clip `zero_shot_classifier.py`).

Each class name is written into every prompt template ("a photo of a {}."), the prompts are
embedded by the text tower and l2-normalised, averaged over templates (prompt ensembling) and
normalised again: one weight vector per class. An image's class is the argmax of the cosine
similarity between its embedding and those vectors. No labelled training data is used, so the
classes need not have been seen in training (with a pretrained text tower).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor

from vfm.data.prompts import ZERO_SHOT_TEMPLATES
from vfm.evaluators.features import SplitFeatures
from vfm.evaluators.metrics import topk_accuracy
from vfm.evaluators.protocols import ImageTextEvaluator, eval_mode

log = logging.getLogger(__name__)


class TextModel(Protocol):
    def encode_text(self, texts: list[str]) -> Tensor: ...
    def project_image(self, features: Tensor) -> Tensor: ...


@torch.no_grad()
def zero_shot_classifier(text_model: TextModel, class_names: Sequence[str], templates: Sequence[str]) -> Tensor:
    """[K, D] l2-normalised class embeddings (mean over templates of normalised prompt embeddings)."""
    weights = []
    for name in class_names:
        emb = F.normalize(text_model.encode_text([t.format(name) for t in templates]).float(), dim=-1)
        weights.append(F.normalize(emb.mean(dim=0), dim=-1))
    return torch.stack(weights)


class ZeroShot(ImageTextEvaluator):
    """Zero-shot top-1/top-5 on the test split (and val), from frozen global image features.

    Args:
        templates: prompt templates with one `{}` (None: `vfm.data.prompts.ZERO_SHOT_TEMPLATES`).
        classes: also report accuracy on the test images of these class indices only (e.g. classes
            held out of training): `zero_shot/subset_top1` among all classes and
            `zero_shot/subset_only_top1` among these classes alone.
    """


    def __init__(self, templates: list[str] | None = None, classes: list[int] | None = None) -> None:
        self.templates = list(templates) if templates else list(ZERO_SHOT_TEMPLATES)
        if any("{}" not in t for t in self.templates):
            raise ValueError("every zero-shot template needs a '{}' where the class name goes")
        self.classes = list(classes) if classes else None

    def __call__(self, features: SplitFeatures, num_classes: int, *, class_names: Sequence[str],
                 text_model: Any) -> dict[str, float]:
        if len(class_names) != num_classes or num_classes == 0:
            raise ValueError(f"zero-shot needs the dataset's {num_classes} class names, got {len(class_names)}")
        device = next(text_model.parameters()).device
        with eval_mode(text_model):
            weights = zero_shot_classifier(text_model, class_names, self.templates).to(device)
        out: dict[str, float] = {}
        for split in ("val", "test"):
            x, y = getattr(features, f"{split}_x"), getattr(features, f"{split}_y")
            if x is None:
                continue
            with torch.no_grad(), eval_mode(text_model):
                logits = (text_model.project_image(x.to(device)) @ weights.T).cpu()
            pre = "zero_shot/" if split == "test" else "zero_shot/val_"
            out[f"{pre}top1"], out[f"{pre}top5"] = topk_accuracy(logits, y, 1), topk_accuracy(logits, y, 5)
            if split == "test" and self.classes:
                sel = torch.isin(y, torch.tensor(self.classes))
                out["zero_shot/subset_top1"] = topk_accuracy(logits[sel], y[sel], 1)
                remap = {c: i for i, c in enumerate(self.classes)}
                sub_y = torch.tensor([remap[int(c)] for c in y[sel]])
                out["zero_shot/subset_only_top1"] = topk_accuracy(logits[sel][:, self.classes], sub_y, 1)
        log.info("zero-shot (%d classes, %d templates): %s", num_classes, len(self.templates),
                 ", ".join(f"{k}={v:.2f}" for k, v in out.items()))
        return out
