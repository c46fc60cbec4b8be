"""The command line around an entry point's `run(cfg)`: what reaches the user as one line and
an exit code instead of a traceback (`run_or_exit`), and what is checked before Hydra starts.

Hydra answers an override of a key that does not exist (`trainer.max_epoch=3`) with advice to
add it (`+trainer.max_epoch=3`), which only leads into a second error; and it creates the run
directory before any of our code runs, so an unwritable `hydra.run.dir` ends in its traceback.
`check_command_line` composes the config as Hydra will and reports either on one line, with
exit code 2, first. Everything else (the values, the data, the files) is checked by
`vfm.config` once the config is composed.
"""

from __future__ import annotations

import difflib
import logging
import os
import sys
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

from hydra.errors import HydraException
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from vfm.config import CONF_DIR, ConfigError, register_resolvers

if TYPE_CHECKING:
    from hydra.core.config_loader import ConfigLoader
    from hydra.core.override_parser.types import Override
    from hydra.types import RunMode

T = TypeVar("T")


def in_multirun() -> bool:
    """True inside a job of a Hydra sweep (`pretrain -m ...`)."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def _user_facing_errors() -> dict[type[BaseException], tuple[str, int]]:
    """Errors whose message says what happened and what to do: shown without a traceback.

    Imported here, not at module level: the command-line checks must not import the training engine.
    """
    from vfm.data.datasets.bad_files import ImageDecodeError
    from vfm.engine.checkpoint import CheckpointError
    from vfm.engine.preemption import Preempted
    from vfm.engine.trainer import NonFiniteLossError

    return {ConfigError: ("config error", 2), ImageDecodeError: ("data error", 2), NonFiniteLossError: ("error", 1),
            CheckpointError: ("error", 1), Preempted: ("preempted", 0)}


def _one_line(e: BaseException) -> str:
    """The error's message; one raised in a DataLoader worker comes back with the worker's
    traceback in its message, whose last line is the original message."""
    text = str(e).strip()
    if "Original Traceback" in text:
        text = text.splitlines()[-1].split(": ", 1)[-1]
    return text


def run_or_exit(
    run: Callable[[DictConfig], T], cfg: DictConfig, on_error: Callable[[BaseException], None] | None = None
) -> T:
    """Call an entry point's `run(cfg)`. A user-facing error (a bad config, an undecodable image
    under `dataset.bad_files=fail`, a diverged loss, an unwritable checkpoint, a stop on a signal)
    becomes one line on stderr and an exit code: 2 for a config or data error, 1 for a failed
    run, 128 + the signal number after a graceful stop. Any other exception is a bug and keeps
    its traceback. Inside a sweep the error is raised instead, so the sweep records this job as
    failed and goes on. `on_error(e)` runs first (e.g. requeue a SLURM job after a stop)."""
    known = _user_facing_errors()
    try:
        return run(cfg)
    except tuple(known) as e:
        if on_error is not None:
            on_error(e)
        label, code = next(v for k, v in known.items() if isinstance(e, k))
        code = getattr(e, "exit_code", code)
        log = logging.getLogger("vfm")
        if in_multirun():
            log.error("%s: %s", label, _one_line(e))
            raise
        print(f"{label}: {_one_line(e)}", file=sys.stderr, flush=True)
        raise SystemExit(code) from None



def check_run_dir(path: Path, key: str) -> None:
    """Raise ConfigError unless a run directory can be made at `path` (`key` is the setting that
    chose it). A temporary folder is made and removed in the nearest folder that exists: nothing
    is left behind, and processes checking at the same time (torchrun) do not race."""
    existing = next(p for p in (path, *path.parents) if p.exists())
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".vfm-write-check-", dir=existing))
    except OSError as e:
        raise ConfigError(
            f"run directory {path} is not writable ({e.strerror or e}): set {key}=... to a writable folder"
            f"{' or paths.output_dir=...' if key.startswith('hydra.') else ''}"
        ) from None


def check_command_line(config_name: str, argv: Sequence[str] | None = None) -> None:
    """Exit with code 2 and one line on stderr when an override names a key that does not exist
    ("did you mean trainer.max_epochs?"), or when the run directory cannot be written. Anything
    else, Hydra reports as it always does."""
    from hydra._internal.utils import get_args_parser

    args = get_args_parser().parse_args(sys.argv[1:] if argv is None else list(argv))
    if not (args.run or args.multirun) and any(
        (args.help, args.hydra_help, args.cfg, args.info, args.shell_completion, args.experimental_rerun)
    ):
        return  # not a run: --help, --cfg, ... compose nothing we need to check
    if args.config_dir or args.config_path or args.config_name:
        return  # another config tree than ours
    try:
        _check_overrides(config_name, list(args.overrides), args.multirun)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None


def _check_overrides(config_name: str, overrides: list[str], multirun: bool) -> None:
    """Compose as Hydra will (a sweep: its first job) and check what Hydra would report worse."""
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.types import RunMode

    try:
        parsed = OverridesParser.create().parse_overrides(overrides)
        first_job = [o.input_line if not o.is_sweep_override() else
                     f"{o.get_key_element()}={next(iter(o.sweep_string_iterator()))}" for o in parsed]
    except (HydraException, ValueError, StopIteration):  # not a list of values (e.g. interval()): Hydra's
        return
    register_resolvers()
    mode = RunMode.MULTIRUN if multirun else RunMode.RUN
    with initialize_config_dir(CONF_DIR, version_base="1.3", job_name=config_name):
        loader = GlobalHydra.instance().config_loader()
        try:
            cfg = loader.load_configuration(config_name, first_job, mode, validate_sweep_overrides=False)
        except (HydraException, OmegaConfBaseException):
            _suggest_key(loader, config_name, parsed, first_job, mode)
            return  # no suggestion: Hydra reports its own error
        _check_hydra_run_dir(cfg, multirun)


def _suggest_key(loader: ConfigLoader, config_name: str, parsed: list[Override], lines: list[str],
                 mode: RunMode) -> None:
    """ConfigError for the first plain override (`a.b=v`: no `+`, not a group) whose key is
    missing from the config composed without the plain overrides."""
    from hydra.core.override_parser.types import OverrideType

    groups = set(loader.list_groups(""))
    plain = [o.type == OverrideType.CHANGE and o.package is None and "/" not in o.key_or_group
             and o.key_or_group not in groups for o in parsed]
    try:
        cfg = loader.load_configuration(config_name, [line for line, p in zip(lines, plain) if not p], mode,
                                        validate_sweep_overrides=False)
    except (HydraException, OmegaConfBaseException):
        return
    for o, p in zip(parsed, plain):
        problem = _unknown_key(cfg, o.key_or_group, config_name) if p else None
        if problem is not None:
            raise ConfigError(problem)


def _unknown_key(cfg: DictConfig, key: str, config_name: str) -> str | None:
    """What is wrong with the dotted `key` of `cfg`, or None when it exists (or lies below a
    value or a list, which Hydra reports): the closest existing key for its first missing part,
    else the keys that part could have been."""
    node, parts = cfg, key.split(".")
    for i, part in enumerate(parts):
        if not isinstance(node, DictConfig):
            return None
        if part in node:
            node = node._get_node(part)
            continue
        keys = [str(k) for k in node.keys() if not str(k).startswith("_")]
        close = difflib.get_close_matches(part, keys, n=1)
        if close:
            guess = ".".join([*parts[:i], close[0], *parts[i + 1:]])
            return f"unknown key {key}. Did you mean {guess}? ({config_name} --cfg job lists every key)"
        parent = ".".join(parts[:i]) or "the config"
        return (f"unknown key {key}: {parent} has no {part!r} (it has {', '.join(keys)}); "
                f"+{key}=... adds a key where new keys are accepted")
    return None


def _check_hydra_run_dir(cfg: DictConfig, multirun: bool) -> None:
    """The folder Hydra will create for this run (or sweep) must be writable."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    key = "hydra.sweep.dir" if multirun or cfg.hydra.mode == RunMode.MULTIRUN else "hydra.run.dir"
    saved = HydraConfig.instance().cfg
    HydraConfig.instance().set_config(cfg)  # ${hydra:job.override_dirname} in the folder name
    try:
        path = Path(str(OmegaConf.select(cfg, key)))
    finally:
        HydraConfig.instance().cfg = saved  # type: ignore[assignment]
    check_run_dir(path, key)
