"""Frozen-feature extraction shared by the kNN and linear-probe evaluators.

Both protocols (DINO's weighted kNN, Caron et al. 2021, and the linear probe of MAE/DINOv2) run
on features of a *frozen* encoder, so the features are computed once per checkpoint and
optionally cached on disk; the evaluators then work on plain tensors. This mirrors the
``extract_features`` step of facebookresearch/dino ``eval_knn.py``.

Which tokens form the feature vector is a *recipe* (`vfm.evaluators.recipes`): ``"global"`` is the encoder's own
output (the final-norm [CLS] of a ViT, the pooled feature of a CNN; kNN and zero-shot use it);
the linear-probe recipes of DINO's ``eval_linear.py`` concatenate the [CLS] token of the last
``n`` blocks, each after the final norm, optionally with the mean of the last block's patch
tokens. All recipes an evaluation needs come out of one forward pass (timm's
``forward_intermediates``), and each is cached in its own file under its own key.

Datasets are duck-typed: anything yielding ``(uint8 image [C, H, W], int label)``. Datasets that
expose whole-split ``.images`` / ``.labels`` tensors (``vfm.data.datasets.TensorImageDataset``)
are sliced directly instead of going through a ``DataLoader``, which avoids per-sample Python
overhead on small benchmark datasets.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import pickle
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from vfm import distributed as vdist
from vfm.engine.device import autocast, resolve_precision
from vfm.evaluators.protocols import eval_mode
from vfm.evaluators.recipes import GLOBAL, RECIPES, encode, extraction_plan, last_blocks, token_backbone
from vfm.io import atomic_torch_save, load_torch

__all__ = [
    "GLOBAL", "RECIPES", "SplitFeatures", "extract_features", "extract_recipe_features", "extract_split_features",
    "extract_split_recipes", "last_blocks", "recipe_cache_path",
]

log = logging.getLogger(__name__)

_SPLITS = ("train", "val", "test")

@dataclass
class SplitFeatures:
    """Features and labels of each split, float32 ``[N, D]`` / int64 ``[N]`` on CPU.

    ``val_*`` / ``test_*`` are ``None`` when the dataset has no such split. ``recipe`` names what
    the features are (``GLOBAL`` or a key of ``RECIPES``); for a recipe the columns are ``n + avgpool``
    blocks of the encoder width: ``[CLS]`` of the oldest block first, the patch mean last.
    """

    train_x: Tensor
    train_y: Tensor
    val_x: Tensor | None = None
    val_y: Tensor | None = None
    test_x: Tensor | None = None
    test_y: Tensor | None = None
    recipe: str = GLOBAL


def _iter_batches(dataset: Dataset, batch_size: int, num_workers: int) -> tuple[int, Iterator[Any]]:
    """Return ``(num_batches, iterator of (images, labels))`` in dataset order."""
    images = getattr(dataset, "images", None)
    labels = getattr(dataset, "labels", None)
    if isinstance(images, Tensor) and isinstance(labels, Tensor) and len(images) == len(labels):
        # Fast path: whole split already in memory as tensors; slicing is a view, no copies.
        n = len(images)
        starts = range(0, n, batch_size)
        return len(starts), ((images[i : i + batch_size], labels[i : i + batch_size]) for i in starts)
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, drop_last=False, num_workers=num_workers)
    return len(loader), iter(loader)


def _to_unit_float(images: Tensor) -> Tensor:
    """uint8 in [0, 255] -> float in [0, 1]; float images are assumed to be in [0, 1] already."""
    if images.dtype == torch.uint8:
        return images.float().div_(255.0)
    return images.float()


@contextlib.contextmanager
def _frozen_on(encoder: nn.Module, device: torch.device) -> Iterator[None]:
    """`encoder` in eval mode on `device` for the block; afterwards every submodule's train/eval
    flag is restored and, if it had to be moved, the encoder goes back to the device it came from
    (a trainer's model is never left on the wrong device or in the wrong mode)."""
    home = next(itertools.chain(encoder.parameters(), encoder.buffers()), None)
    home_device = home.device if home is not None else device
    if home_device != device:
        encoder.to(device)
    try:
        with eval_mode(encoder):  # each submodule's own flag restored (e.g. norms frozen on purpose)
            yield
    finally:
        if home_device != device:
            encoder.to(home_device)


def _eval_input(images: Tensor, crop_size: int | None, mean: Tensor, std: Tensor) -> Tensor:
    """The eval transform of DINO / MAE on a batch: ``[B, C, H, W]`` images (uint8 or float in
    [0, 1]) centre-cropped to ``crop_size`` when larger, then normalised with ``mean`` / ``std``
    (``[1, C, 1, 1]``)."""
    x = _to_unit_float(images)
    if crop_size is not None and (x.shape[-2] > crop_size or x.shape[-1] > crop_size):
        top, left = (x.shape[-2] - crop_size) // 2, (x.shape[-1] - crop_size) // 2
        x = x[..., top : top + crop_size, left : left + crop_size]
    if mean.shape[1] != x.shape[1] or std.shape[1] != x.shape[1]:
        raise ValueError(f"mean/std have {mean.shape[1]}/{std.shape[1]} entries but images have {x.shape[1]} channels")
    return (x - mean) / std


def extract_features(encoder: nn.Module, dataset: Dataset, **kwargs: Any) -> tuple[Tensor, Tensor]:
    """The global features ``encoder(x)`` of every sample: ``(float32 [N, D], int64 [N])`` on CPU,
    in dataset order. ``encoder(x)`` must return ``[B, D]``; ``kwargs`` as in
    :func:`extract_recipe_features`."""
    feats, labels = extract_recipe_features(encoder, dataset, (GLOBAL,), **kwargs)
    return feats[GLOBAL], labels


@torch.no_grad()
def extract_recipe_features(
    encoder: nn.Module,
    dataset: Dataset,
    recipes: Sequence[str],
    *,
    mean: Sequence[float],
    std: Sequence[float],
    batch_size: int = 512,
    device: str | torch.device = "cpu",
    precision: str = "fp32",
    progress: bool = True,
    desc: str = "features",
    num_workers: int = 0,
    crop_size: int | None = None,
) -> tuple[dict[str, Tensor], Tensor]:
    """Encode every sample of ``dataset`` with a frozen ``encoder``, once, for every recipe.

    Images are scaled to [0, 1] and normalised with ``mean`` / ``std`` (per channel) before the
    forward, exactly like the eval transforms of DINO / MAE.

    Args:
        encoder: the network to evaluate. It runs in eval mode on ``device``; afterwards every
            submodule's train/eval flag is restored and, if it had to be moved, it is moved back
            to the device it came from (so a trainer's model is never left on the wrong device).
        dataset: yields ``(uint8 image [C, H, W], int label)``.
        recipes: ``GLOBAL`` and/or keys of ``RECIPES``, as resolved by `extraction_plan` (a
            recipe an encoder cannot give is an error here).
        mean, std: per-channel normalisation, in [0, 1] units.
        batch_size: images per forward.
        device: where the forward runs.
        precision: ``"fp32"``, ``"bf16"`` or ``"fp16"``; the latter two autocast the forward only.
            ``"auto"``: bf16 where it is faster than fp32 on ``device``, else fp32
            (``vfm.engine.device.resolve_precision``).
        progress: show a tqdm bar.
        desc: the bar's label.
        num_workers: ``DataLoader`` workers for datasets without in-memory ``.images``.
        crop_size: centre-crop larger images to this size first (the standard eval transform:
            folder datasets store training images at ``load_size`` > ``img_size``).

    Returns:
        ``({recipe: float32 [N, D_recipe]}, labels int64 [N])`` on CPU, in dataset order.
    """
    recipes = tuple(dict.fromkeys(recipes))
    if any(r != GLOBAL for r in recipes) and token_backbone(encoder) is None:
        raise ValueError(f"recipes {recipes} need a ViT Backbone with a [CLS] token; resolve them with extraction_plan")
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    precision = resolve_precision(precision, device)[0]  # a ValueError for an unknown one
    mean_t = torch.tensor(list(mean), dtype=torch.float32, device=device).view(1, -1, 1, 1)
    std_t = torch.tensor(list(std), dtype=torch.float32, device=device).view(1, -1, 1, 1)
    feats: dict[str, list[Tensor]] = {r: [] for r in recipes}
    labs: list[Tensor] = []
    with _frozen_on(encoder, device):
        num_batches, batches = _iter_batches(dataset, batch_size, num_workers)
        for images, labels in tqdm(batches, total=num_batches, desc=desc, disable=not progress, leave=False):
            x = _eval_input(images.to(device, non_blocking=True), crop_size, mean_t, std_t)
            with autocast(precision, device):  # a fresh context per forward: only the forward is cast
                out = encode(encoder, x, recipes)
            for r in recipes:
                feats[r].append(out[r].float().cpu())
            labs.append(torch.as_tensor(labels, dtype=torch.int64).reshape(-1).cpu())

    if not labs:
        return {r: torch.empty(0, 0) for r in recipes}, torch.empty(0, dtype=torch.int64)
    return {r: torch.cat(f) for r, f in feats.items()}, torch.cat(labs)


def _cache_matches(cached: Any, cache_key: str, splits: Any) -> bool:
    """True when a loaded cache was written under ``cache_key`` for splits of the same sizes."""
    if not isinstance(cached, dict) or cached.get("key") != cache_key:
        return False
    dims = set()
    for name in _SPLITS:
        ds, x, y = getattr(splits, name, None), cached.get(f"{name}_x"), cached.get(f"{name}_y")
        if ds is None:
            if x is not None or y is not None:
                return False
            continue
        if not (isinstance(x, Tensor) and isinstance(y, Tensor)):
            return False
        if x.ndim != 2 or y.ndim != 1 or len(x) != len(y) or len(x) > len(ds) or cached.get(f"{name}_n", len(x)) != len(ds):
            return False
        dims.add(x.shape[1])
    return len(dims) == 1


def recipe_cache_path(path: str | Path, recipe: str) -> Path:
    """Where ``recipe``'s features of a cache ``path`` live: ``path`` itself for ``GLOBAL``,
    ``<stem>.<recipe><suffix>`` beside it otherwise (recipes never overwrite each other)."""
    path = Path(path)
    return path if recipe == GLOBAL else path.with_name(f"{path.stem}.{recipe}{path.suffix}")


def _recipe_key(cache_key: str, recipe: str) -> str:
    return cache_key if recipe == GLOBAL else f"{cache_key}|{recipe}"


def _load_cache(path: Path, cache_key: str, splits: Any, recipe: str) -> SplitFeatures | None:
    """The cached features at ``path`` if they were written under ``cache_key`` for these splits."""
    if not path.is_file():
        return None
    try:
        cached = load_torch(path)
    # A truncated or foreign file must not kill the evaluation: recompute instead.
    except (OSError, EOFError, RuntimeError, ValueError, pickle.UnpicklingError) as err:
        log.warning("ignoring unreadable feature cache %s (%s)", path, err)
        return None
    if not _cache_matches(cached, cache_key, splits):
        log.info("feature cache %s is stale (key or sizes differ); recomputing", path)
        return None
    log.info("loaded cached features from %s", path)
    return SplitFeatures(**{f"{n}_{v}": cached[f"{n}_{v}"] for n in _SPLITS for v in "xy"}, recipe=recipe)


def extract_split_features(
    encoder: nn.Module,
    splits: Any,
    *,
    cache_path: str | Path | None = None,
    cache_key: str = "",
    **kwargs: Any,
) -> SplitFeatures:
    """The global features (``encoder(x)``) of the train / val / test splits of a
    ``DataSplits``-like object; arguments as in :func:`extract_split_recipes`."""
    return extract_split_recipes(encoder, splits, (GLOBAL,), cache_path=cache_path, cache_key=cache_key, **kwargs)[GLOBAL]


def extract_split_recipes(
    encoder: nn.Module,
    splits: Any,
    recipes: Sequence[str],
    *,
    cache_path: str | Path | None = None,
    cache_key: str = "",
    **kwargs: Any,
) -> dict[str, SplitFeatures]:
    """Features of every recipe in ``recipes`` for the train / val / test splits, from one pass.

    Args:
        encoder: frozen encoder, see :func:`extract_recipe_features`.
        splits: has ``train``, ``val``, ``test`` (datasets or ``None``), ``mean`` and ``std``.
        recipes: ``GLOBAL`` and/or keys of ``RECIPES``; one the encoder cannot give falls back
            (`extraction_plan`) and its entry is then the fallback's features (see ``.recipe``).
        cache_path: optional file for the ``GLOBAL`` features; another recipe's file is
            `recipe_cache_path`. A file that exists, was written under the same key and holds
            features of the right sizes is loaded instead of running the encoder; the others are
            computed (one forward for all of them) and saved atomically.
        cache_key: identifies what produced the features (e.g. checkpoint path + step + dataset);
            a different key invalidates the cache. A recipe's key adds its name.
        **kwargs: forwarded to :func:`extract_recipe_features`; ``mean`` / ``std`` default to
            ``splits.mean`` / ``splits.std``.

    Returns:
        {recipe asked for: its `SplitFeatures`}.
    """
    plan = extraction_plan(encoder, recipes)
    path = Path(cache_path) if cache_path is not None else None
    done: dict[str, SplitFeatures] = {}
    for r in dict.fromkeys(plan.values()):
        cached = path and _load_cache(recipe_cache_path(path, r), _recipe_key(cache_key, r), splits, r)
        if cached is not None:
            done[r] = cached
    missing = [r for r in dict.fromkeys(plan.values()) if r not in done]
    if missing:
        computed, sizes = _extract_splits(encoder, splits, missing, **kwargs)
        done.update(computed)
        # Under torchrun every process extracts; one writer is enough (the others would only race
        # to replace the file with identical content).
        if path is not None and vdist.is_main_process():
            for r in missing:
                out = {f"{n}_{v}": getattr(computed[r], f"{n}_{v}") for n in _SPLITS for v in "xy"}
                atomic_torch_save({"key": _recipe_key(cache_key, r), **out, **sizes}, recipe_cache_path(path, r))
                log.info("saved %s features to %s", r, recipe_cache_path(path, r))
    return {r: done[plan[r]] for r in recipes}


def _extract_splits(
    encoder: nn.Module, splits: Any, recipes: Sequence[str], **kwargs: Any
) -> tuple[dict[str, SplitFeatures], dict[str, int]]:
    """({recipe: SplitFeatures}, {"<split>_n": dataset size}) without labels < 0 (e.g. STL-10's
    unlabelled images in the pretraining split)."""
    kwargs.setdefault("mean", splits.mean)
    kwargs.setdefault("std", splits.std)
    kwargs.setdefault("crop_size", getattr(splits, "img_size", None))
    desc = kwargs.pop("desc", "features")
    out: dict[str, dict[str, Tensor | None]] = {r: {} for r in recipes}
    for name in _SPLITS:
        ds = getattr(splits, name, None)
        xs: dict[str, Tensor | None] = dict.fromkeys(recipes)
        y = None
        if ds is not None:
            xs, y = extract_recipe_features(encoder, ds, recipes, desc=f"{desc}/{name}", **kwargs)
            if bool((y < 0).any()):
                keep = y >= 0
                log.info("%s: dropping %d unlabelled samples from evaluation", name, int((~keep).sum()))
                xs, y = {r: x[keep] for r, x in xs.items()}, y[keep]
        for r in recipes:
            out[r][f"{name}_x"], out[r][f"{name}_y"] = xs[r], y
    # dataset sizes too: unlabelled samples are dropped from x/y, so len(x) may be < len(ds)
    sizes = {f"{n}_n": len(getattr(splits, n)) for n in _SPLITS if getattr(splits, n, None) is not None}
    return {r: SplitFeatures(**v, recipe=r) for r, v in out.items()}, sizes
