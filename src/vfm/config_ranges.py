"""The values a config key may take, declared once per key pattern.

`validate_node` checks types against constructor signatures; a signature cannot say that a
learning rate is positive or a probability at most 1. `RULES` says it, per pattern over the
dotted key (`fnmatch`: `*` also matches dots), first match wins. A number outside its range
fails before anything is built: `optim.blr=-1` would otherwise train by gradient ascent,
`method.student_temp=0` divide by zero, `backbone.patch_size=0` end in ZeroDivisionError.
A list of numbers (`betas`, `blur_p`, crop scales) is checked element by element.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from fnmatch import fnmatchcase
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import InterpolationResolutionError


@dataclass(frozen=True)
class Bound:
    """Numbers from `lo` to `hi` (None: unbounded); an open end excludes its value."""

    lo: float | None = None
    hi: float | None = None
    open_lo: bool = False
    open_hi: bool = False
    example: str | None = None  # a typical value, shown in the fix

    def admits(self, v: Any) -> bool:
        if isinstance(v, bool) or not isinstance(v, (int, float)) or v != v:  # v != v: NaN
            return False
        above = self.lo is None or (v > self.lo if self.open_lo else v >= self.lo)
        below = self.hi is None or (v < self.hi if self.open_hi else v <= self.hi)
        return above and below

    def __str__(self) -> str:
        if self.hi is None:
            return f"{'>' if self.open_lo else '>='} {self.lo:g}"
        return f"in {'(' if self.open_lo else '['}{self.lo:g}, {self.hi:g}{')' if self.open_hi else ']'}"


@dataclass(frozen=True)
class OneOf:
    """Strings that match `regex` in full; `text` lists them for the message."""

    regex: str
    text: str

    def admits(self, v: Any) -> bool:
        return isinstance(v, str) and re.fullmatch(self.regex, v) is not None

    def __str__(self) -> str:
        return f"one of {self.text}"


COUNT = Bound(1)
NON_NEGATIVE = Bound(0)
PROBABILITY = Bound(0, 1)
BELOW_ONE = Bound(0, 1, open_hi=True)  # a share that must leave something: drop rates, mask ratios, smoothing
UNIT = Bound(0, 1, open_lo=True)  # a non-empty share: crop scales, layer-wise decay

# (key patterns, allowed values), first match wins: the specific patterns come before the
# general ones they would also match (`*warmup_epochs` may be 0, `*epochs` may not).
RULES: tuple[tuple[tuple[str, ...], Bound | OneOf], ...] = (
    (("*.device",), OneOf(r"auto|cpu|cuda(:\d+)?", "auto, cpu, cuda, cuda:N")),
    (("*.blr", "*.lr", "*.lrs"), Bound(0, open_lo=True, example="0.0005")),
    (("*_temp", "*temperature", "*_temp.start", "*_temp.value"), Bound(0, open_lo=True, example="0.1")),
    (("*.eps",), Bound(0, open_lo=True, example="1e-08")),
    (("*.std", "*blur_sigma", "*.mlp_ratio", "*.max_logit_scale", "*.dist_timeout_s"), Bound(0, open_lo=True)),
    (("*log_every_n_steps",), COUNT),
    (("*warmup_epochs", "*every_n_*", "*schedules.*.epochs", "*.num_workers", "*.min_lr", "*weight_decay*",
      "*.clip_grad", "*_weight", "*.lambda_*", "*lr_mult", "*.mixup", "*.cutmix", "*.beta", "*.dead_code_threshold",
      "*.sinkhorn_iterations", "*.min_num_patches", "*.n_local", "*.num_classes", "*.brightness", "*.contrast",
      "*.saturation", "*.data_timeout_s", "*.flush_secs", "*seed", "*.num_val", "*.num_test"), NON_NEGATIVE),
    (("*batch_size", "*epochs", "*.stop_after_epoch", "*.max_steps", "*.accum_steps", "*.prefetch_factor",
      "*.lr_reference_batch", "*_dim", "*.width", "*.patch_size", "*img_size", "*.load_size", "*crop_size",
      "*.in_chans", "*.n_global", "*.layers", "*.head_layers", "*.heads", "*.num_heads", "*.decoder_heads", "*.depth",
      "*.decoder_depth", "*.num_codes", "*.k", "*.context_length", "*.max_length", "*.num_train", "*.max_pairs",
      "*.image_text_ks"),
     COUNT),
    (("*_p", "*prob*", "*momentum", "*momentum.base", "*momentum.final", "*max_bad_fraction", "*ratio_range"),
     PROBABILITY),
    (("*.betas", "*.decay", "*.ratio", "*.val_fraction", "*.label_smoothing", "*drop_path", "*drop_path_rate"), BELOW_ONE),
    (("*crop_scale", "*global_scale", "*local_scale", "*layer_decay", "*layerwise_decay"), UNIT),
    (("*.hue",), Bound(0, 0.5)),
)


def rule_for(key: str) -> Bound | OneOf | None:
    """The allowed values of the dotted `key` (None: any value of the right type)."""
    for patterns, allowed in RULES:
        if any(fnmatchcase(key, p) for p in patterns):
            return allowed
    return None


def _leaves(node: DictConfig, prefix: str) -> Iterator[tuple[str, DictConfig, str]]:
    """(dotted key, parent node, key) of every value under `node` that is not itself a mapping.
    Nothing is resolved here: a key no rule covers (e.g. `paths.output_dir: ${hydra:...}`) is
    never read."""
    for key in node.keys():
        key = str(key)
        if key.startswith("_"):  # _target_, _partial_: Hydra's, not values
            continue
        child = node._get_node(key)
        path = f"{prefix}.{key}" if prefix else key
        if isinstance(child, DictConfig) and not OmegaConf.is_interpolation(node, key):
            yield from _leaves(child, path)
        elif not OmegaConf.is_missing(node, key):
            yield path, node, key


def out_of_range(cfg: DictConfig) -> str | None:
    """One line naming the first value of `cfg` outside the range its key's rule allows and the
    fix, or None when every value is allowed. None (an unset optional key) always passes."""
    for path, parent, key in _leaves(cfg, ""):
        allowed = rule_for(path)
        if allowed is None:
            continue
        try:
            value = parent[key]
        except InterpolationResolutionError as e:
            return f"{path} cannot be resolved: {e}"
        plain = OmegaConf.to_object(value) if isinstance(value, (DictConfig, ListConfig)) else value
        is_list = isinstance(plain, (list, tuple)) and isinstance(allowed, Bound)
        if all(v is None or allowed.admits(v) for v in (plain if is_list else [plain])):
            continue
        if isinstance(allowed, OneOf):
            return f"{path}={plain!r} is not allowed: set {path} to {allowed}"
        example = f" (e.g. {path}={allowed.example})" if allowed.example else ""
        return f"{path}={plain!r} is not allowed: set {path} to {'values' if is_list else 'a value'} {allowed}{example}"
    return None
