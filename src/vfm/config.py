"""Config validation that runs before any data is read or any model is built.

Every node with a `_target_` is checked against the signature of the callable it names: unknown
keys, missing required values and wrong types fail with the full key path and a fix; every number
is then checked against the range its key allows (`vfm.config_ranges`). Cross-field rules (batch
divisibility, patch tokens, crop sizes, the device) follow. All of it only imports code and
reads the config, so a bad command fails in about a second.
"""

from __future__ import annotations

import difflib
import hashlib
import inspect
import os
import types
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Union

from hydra.utils import get_object
from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import InterpolationResolutionError

from vfm.config_ranges import out_of_range

# The Hydra config tree lives at the repository root (conf/), next to src/; VFM_CONF_DIR overrides it.
CONF_DIR = os.environ.get("VFM_CONF_DIR", str(Path(__file__).resolve().parents[2] / "conf"))

# keys of a method node that are not constructor arguments but separate components (and the
# paper whose evaluation protocol the evaluators follow: evaluator.linear.paper)
METHOD_COMPONENT_KEYS = ("augment", "schedules", "masking", "eval_protocol")
_HYDRA_KEYS = {"_target_", "_partial_", "_recursive_", "_convert_", "_args_"}


class ConfigError(ValueError):
    """A config problem, reported with the key and how to fix it."""


_MAX_RUN_NAME = 200  # file systems allow 255 bytes per name


def run_name(override_dirname: str) -> str:
    """The run folder name for a list of overrides: the overrides themselves ("default" if none).

    A name too long for a file system keeps its first characters and ends with a hash of the
    whole: two runs that differ only in their last overrides must never share a folder (the
    second would resume from the first's checkpoint).
    """
    name = str(override_dirname).replace("/", "_") or "default"
    if len(name.encode()) <= _MAX_RUN_NAME:
        return name
    digest = hashlib.sha1(name.encode()).hexdigest()[:10]
    return name.encode()[: _MAX_RUN_NAME - 16].decode(errors="ignore").rstrip("+") + "+hash-" + digest


def register_resolvers() -> None:
    """`${vfm.run_name:${hydra:job.override_dirname}}`: the run folder name (see `run_name`)."""
    if not OmegaConf.has_resolver("vfm.run_name"):
        OmegaConf.register_new_resolver("vfm.run_name", run_name)


def instantiate_checked(node: DictConfig | dict, key: str, **kwargs: Any) -> Any:
    """`hydra.utils.instantiate(node, **kwargs)` for the config node at `key`. A constructor that
    rejects its arguments (a ValueError; a FileNotFoundError for a file or folder that is not
    there) is a config error naming `key`, not a traceback; any other error propagates."""
    from hydra.errors import InstantiationException
    from hydra.utils import instantiate

    try:
        return instantiate(node, **kwargs)
    except InstantiationException as e:
        cause = e.__cause__
        if isinstance(cause, ConfigError):
            raise cause from None
        if isinstance(cause, (ValueError, FileNotFoundError)):
            raise ConfigError(f"{key} ({node.get('_target_')}): {cause}") from e
        raise


def instantiate_evaluators(cfg: DictConfig) -> dict[str, Any]:
    """The evaluators under `evaluator` (name -> evaluator). Those that train and draw their own
    progress bars (fine-tuning) follow `trainer.progress`, as the pretraining loop does."""
    evaluators = {}
    for name, node in (cfg.get("evaluator") or {}).items():
        takes_progress = "progress" in inspect.signature(get_object(node._target_)).parameters
        kwargs = {"progress": bool(cfg.trainer.progress)} if takes_progress else {}
        evaluators[name] = instantiate_checked(node, f"evaluator.{name}", **kwargs)
    return evaluators


def _type_ok(value: Any, ann: Any) -> bool:
    if ann is inspect.Parameter.empty or ann is Any:
        return True
    origin = typing.get_origin(ann)
    if origin in (Union, types.UnionType):
        return any(_type_ok(value, a) for a in typing.get_args(ann))
    if ann is type(None):
        return value is None
    if value is None:
        return False
    if ann is bool:
        return isinstance(value, bool)
    if ann is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if ann is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if ann is str:
        return isinstance(value, str)
    if origin is typing.Literal:
        return value in typing.get_args(ann)
    if origin in (list, tuple, Sequence, typing.Sequence) or ann in (list, tuple):
        if not isinstance(value, (list, tuple, ListConfig)):
            return False
        args = [a for a in typing.get_args(ann) if a is not Ellipsis]
        return all(_type_ok(v, args[0]) for v in value) if len(args) == 1 or (args and origin is not tuple) else True
    if origin in (dict, Mapping, typing.Mapping) or ann in (dict,):
        return isinstance(value, (dict, DictConfig))
    return True  # modules, tensors, callables: passed in code, not from YAML


def _describe(ann: Any) -> str:
    return getattr(ann, "__name__", None) or str(ann).replace("typing.", "")


def validate_node(node: DictConfig, path: str, skip: Sequence[str] = ()) -> None:
    """Check one `_target_` node (and its nested `_target_` nodes) against the target's signature."""
    target = node.get("_target_")
    try:
        obj = get_object(target)
    except Exception as e:
        raise ConfigError(f"{path}._target_={target!r} cannot be imported ({e}); check the spelling") from e
    fn = obj.__init__ if inspect.isclass(obj) else obj
    sig = inspect.signature(fn)
    try:
        hints = typing.get_type_hints(fn)
    except Exception:
        hints = {}
    params = {n: p for n, p in sig.parameters.items() if n not in ("self",)}
    var_kw = any(p.kind is p.VAR_KEYWORD for p in params.values())
    accepted = [n for n, p in params.items() if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
    for key in node.keys():
        key = str(key)
        if key in _HYDRA_KEYS or key in skip:
            continue
        if key not in params and not var_kw:
            close = difflib.get_close_matches(key, accepted, n=1)
            hint = f" Did you mean {path}.{close[0]}?" if close else ""
            raise ConfigError(
                f"unknown key {path}.{key} for {target}.{hint} Accepted keys: {', '.join(accepted)}"
            )
        if OmegaConf.is_missing(node, key):
            raise ConfigError(f"missing required value {path}.{key}: pass it on the command line, e.g. {path}.{key}=...")
        try:
            value = node[key]
        except InterpolationResolutionError as e:
            raise ConfigError(f"{path}.{key} cannot be resolved: {e}") from e
        if isinstance(value, DictConfig) and "_target_" in value:
            validate_node(value, f"{path}.{key}")
            continue
        if isinstance(value, DictConfig) and key not in params:
            continue
        ann = hints.get(key, params[key].annotation if key in params else inspect.Parameter.empty)
        plain = OmegaConf.to_object(value) if isinstance(value, (DictConfig, ListConfig)) else value
        if not _type_ok(plain, ann):
            raise ConfigError(
                f"{path}.{key}={plain!r} has the wrong type: {target} expects {_describe(ann)}"
                f" (e.g. {path}.{key}={_example(ann)})"
            )
    # required constructor arguments that the config must supply
    for name, p in params.items():
        if p.default is inspect.Parameter.empty and p.kind is p.KEYWORD_ONLY and name not in node and name not in skip:
            raise ConfigError(f"missing required key {path}.{name} for {target}; add {path}.{name}=...")


def _example(ann: Any) -> str:
    for t, ex in ((bool, "true"), (int, "10"), (float, "0.001"), (str, "name")):
        if ann is t or t in typing.get_args(ann):
            return ex
    return "[...]"


def _resolve_all(cfg: DictConfig) -> None:
    try:
        OmegaConf.to_container(cfg, resolve=True, throw_on_missing=False)
    except InterpolationResolutionError as e:
        raise ConfigError(f"config interpolation failed: {e}") from e


def _check_missing(cfg: DictConfig, prefix: str = "") -> None:
    for key in cfg.keys():
        path = f"{prefix}.{key}" if prefix else str(key)
        if OmegaConf.is_missing(cfg, key):
            raise ConfigError(f"missing required value {path}: pass it on the command line, e.g. {path}=...")
        v = cfg._get_node(key)
        if isinstance(v, DictConfig):
            _check_missing(v, path)


def validate_pretrain(cfg: DictConfig, world_size: int = 1) -> None:
    """All checks for `pretrain`; raises ConfigError naming the key and the fix."""
    skip_hydra = {"hydra"}
    _check_missing(OmegaConf.masked_copy(cfg, [k for k in cfg.keys() if k not in skip_hydra]))
    for group in ("backbone", "dataset", "optim", "trainer", "logger"):
        if group not in cfg or cfg[group] is None:
            raise ConfigError(f"config group {group} is missing; select one, e.g. {group}=...")
        validate_node(cfg[group], group)
    validate_node(cfg.method, "method", skip=METHOD_COMPONENT_KEYS)
    if "augment" in cfg.method:
        validate_node(cfg.method.augment, "method.augment")
    if cfg.method.get("masking") is not None:  # a partial: the collate passes these three
        validate_node(cfg.method.masking, "method.masking", skip=("batch_size", "grid_size", "generator"))
    for name, spec in (cfg.method.get("schedules") or {}).items():
        validate_node(spec, f"method.schedules.{name}")
    for name, ev in (cfg.get("evaluator") or {}).items():
        validate_node(ev, f"evaluator.{name}", skip=("device",))
    _check_ranges(cfg)
    _cross_checks(cfg, world_size)


def validate_evaluate(cfg: DictConfig) -> None:
    _check_missing(OmegaConf.masked_copy(cfg, [k for k in cfg.keys() if k != "hydra"]))
    for group in ("backbone", "dataset", "trainer"):
        validate_node(cfg[group], group)
    for name, ev in (cfg.get("evaluator") or {}).items():
        validate_node(ev, f"evaluator.{name}", skip=("device",))
    _check_ranges(cfg)
    _check_device(cfg.trainer.device)


def _check_ranges(cfg: DictConfig) -> None:
    """Every number against the range its key allows (`vfm.config_ranges.RULES`)."""
    problem = out_of_range(OmegaConf.masked_copy(cfg, [k for k in cfg.keys() if k != "hydra"]))
    if problem is not None:
        raise ConfigError(problem)


def _check_device(device: str) -> None:
    """A CUDA device this machine does not have (the spelling is checked with the ranges)."""
    if not device.startswith("cuda"):
        return
    import torch

    visible = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if int(device.partition(":")[2] or 0) >= visible:
        raise ConfigError(f"trainer.device={device} but {visible} CUDA device(s) are visible; "
                          f"use trainer.device=auto or cpu{' or cuda:0' if visible else ''}")


def dataset_yields_captions(target: str) -> bool:
    """Ask the dataset builder `target` (a `dataset._target_`) whether its training split yields
    `(image, caption, label)`: image-text builders declare `yields_captions = True` on themselves.
    Only imports the builder; no data is read."""
    builder = get_object(target)
    return bool(getattr(builder, "yields_captions", False))  # undeclared (e.g. a user's builder): images only


def _cross_checks(cfg: DictConfig, world_size: int) -> None:
    """Rules between keys of different groups, in the order a user would fix them."""
    from vfm.backbones.timm_backbone import _is_vit

    _check_trainer(cfg.trainer, world_size)
    try:
        is_vit = _is_vit(cfg.backbone.name)
    except ValueError as e:
        raise ConfigError(f"backbone.name: {e}") from e
    _check_method_and_data(cfg, is_vit)
    _check_crops(cfg, is_vit)
    _check_method_files(cfg.method)
    if cfg.get("evaluator") and cfg.dataset.num_classes == 0:
        raise ConfigError(
            f"evaluators {list(cfg.evaluator.keys())} need labels but dataset {cfg.dataset._target_} has none; "
            f"pass evaluator=[] (then evaluate the checkpoint on a labelled dataset with `evaluate`)"
        )
    _check_periodic(cfg)


def _check_periodic(cfg: DictConfig) -> None:
    """Evaluating during training (`eval.every_n_epochs`) runs `eval.periodic`: some of the run's evaluators."""
    every = cfg.eval.every_n_epochs
    if not every:
        return
    names, periodic = list((cfg.get("evaluator") or {}).keys()), list(cfg.eval.get("periodic") or [])
    example = "knn" if "knn" in names else (names[0] if names else None)
    fix = f"eval.periodic=[{example}]" if example else "an evaluator (e.g. evaluator=[knn])"
    if not periodic:
        raise ConfigError(f"eval.periodic=[] runs nothing every eval.every_n_epochs={every} epochs; set {fix} "
                          f"or eval.every_n_epochs=0")
    missing = [p for p in periodic if p not in names]
    if missing:
        raise ConfigError(f"eval.periodic=[{','.join(periodic)}] names {', '.join(missing)}, not among this run's "
                          f"evaluator=[{','.join(names)}]; set {fix} or eval.every_n_epochs=0")


def _check_trainer(tr: DictConfig, world_size: int) -> None:
    _check_device(tr.device)
    per = world_size * tr.accum_steps
    if tr.batch_size % per != 0:
        raise ConfigError(
            f"trainer.batch_size={tr.batch_size} is not divisible by {world_size} process(es) x "
            f"trainer.accum_steps={tr.accum_steps}; use a multiple of {per}, e.g. trainer.batch_size={per * max(1, tr.batch_size // per)}"
        )
    if tr.precision == "fp16" and tr.device == "cpu":
        raise ConfigError("trainer.precision=fp16 needs a GPU; on the CPU use trainer.precision=bf16 or fp32")


def _check_method_and_data(cfg: DictConfig, is_vit: bool) -> None:
    """What the method class declares it needs (`Method.needs_captions`, `needs_patch_tokens`)
    against what the dataset and the backbone give."""
    from vfm.methods.base import Method

    method_cls, ds = get_object(cfg.method._target_), cfg.dataset
    if not (inspect.isclass(method_cls) and issubclass(method_cls, Method)):
        raise ConfigError(f"method._target_={cfg.method._target_} is not a vfm.methods.base.Method subclass")
    if method_cls.needs_captions and not dataset_yields_captions(ds._target_):
        raise ConfigError(
            f"method {cfg.method._target_} trains on image-text pairs but dataset {ds._target_} has no captions; "
            "use dataset=fashion_mnist_captions (labels turned into captions), image_text_csv or webdataset"
        )
    if method_cls.needs_patch_tokens and not is_vit:
        raise ConfigError(
            f"method {cfg.method._target_} needs patch tokens but backbone.name={cfg.backbone.name} has none; "
            f"use a ViT backbone, e.g. backbone=vit_small"
        )


def _check_crops(cfg: DictConfig, is_vit: bool) -> None:
    """Image and crop sizes against the patch size."""
    img, patch, aug = cfg.dataset.img_size, cfg.backbone.get("patch_size"), cfg.method.get("augment")
    if is_vit and patch:
        if img % patch:
            raise ConfigError(
                f"backbone.patch_size={patch} does not divide dataset.img_size={img}; pick a divisor of {img}"
            )
        for key in ("global_crop_size", "local_crop_size"):
            if aug is not None and key in aug and aug[key] % patch:
                raise ConfigError(
                    f"method.augment.{key}={aug[key]} is not a multiple of backbone.patch_size={patch}"
                )
    if aug is not None and "local_crop_size" in aug and aug.local_crop_size > aug.global_crop_size:
        raise ConfigError(
            f"method.augment.local_crop_size={aug.local_crop_size} exceeds global_crop_size={aug.global_crop_size} "
            f"(dataset.img_size={img}); set method.augment.local_crop_size smaller, e.g. {max(1, img * 3 // 7)}"
        )


def _check_method_files(method: DictConfig) -> None:
    for key in ("teacher", "tokenizer"):  # files a method loads: fail before anything is built
        value = method.get(key)
        if isinstance(value, str) and value and not Path(value).exists():
            raise ConfigError(
                f"method.{key}={value} does not exist; pass a pretrain run directory (or its "
                f"{'tokenizer.pt' if key == 'tokenizer' else 'encoder.safetensors / checkpoints/last.pt'})"
            )


def applied_configs() -> dict[str, list[str]] | None:
    """What this command composed: {"files": every file of conf/ applied, in merge order (later
    ones win), "overrides": the command-line overrides}; Hydra's own files (hydra/...) left out.

    For `pretrain` with no overrides the files are pretrain.yaml, paths/default, backbone/vit_tiny_d6,
    method/dino, dataset/fashion_mnist, optim/adamw, optim/dino, trainer/default, logger/tensorboard,
    evaluator/knn, evaluator/linear, then recipe/dino_fashion_mnist (the optional
    `recipe: ${method}_${dataset}`, listed only when such a file exists) and an experiment when one
    is selected. Recomputed from Hydra's defaults list (no config is loaded again). None when the
    config was not composed by a Hydra command (tests and scripts compose their own).
    """
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if not (HydraConfig.initialized() and GlobalHydra.instance().is_initialized()):
        return None
    hc = HydraConfig.get()
    overrides = list(hc.overrides.task)
    defaults = GlobalHydra.instance().config_loader().compute_defaults_list(hc.job.config_name, overrides, RunMode.RUN)
    paths = [d.config_path for d in defaults.defaults if d.config_path]
    files = [f"{p}.yaml" for p in paths if p != "hydra" and not p.startswith(("hydra/", "_dummy"))]
    return {"files": files, "overrides": overrides}
