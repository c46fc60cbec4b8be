"""Files in and out: atomic writes, the one way this package puts a file in place, and
`load_torch`, the one way it reads a `.pt` file back.

A reader (a resumed run, another rank, a sweep summariser) sees either the previous file or the
complete new one, never a torn one: the bytes go to a temporary file in the same directory, which
`os.replace` then renames over the target. The temporary name is `.<name>.tmp-<pid>`, so a file
left by a process killed mid-write is recognisable and never mistaken for a
result (`vfm.engine.checkpoint.remove_stale_temporaries` deletes such files).

`load_torch` unpickles with `weights_only=True`: tensors, plain Python types and the few NumPy
globals of an RNG state, never code. A checkpoint, teacher or tokenizer downloaded from anywhere
can therefore be opened safely; one that needs more is refused before any of it runs, unless the
user sets `VFM_TRUST_CHECKPOINTS=1` (docs/reliability.md).
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import re
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

import numpy as np
import torch

from vfm.config import ConfigError

log = logging.getLogger(__name__)


def temporary_name(path: Path) -> Path:
    """Where `atomic_write` puts the bytes of `path` before the rename."""
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


def _fsync_dir(directory: Path) -> None:
    # the rename itself is durable only once the directory entry is on disk
    try:
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:  # some file systems cannot fsync a directory; the rename is still atomic
        pass


def atomic_write(path: str | Path, write: Callable[[IO[bytes]], None], *, durable: bool = False) -> Path:
    """Call `write(f)` on a temporary binary file next to `path`, then rename it to `path`.

    On any failure the temporary file is removed and the previous `path` (if any) is untouched.
    `durable=True` also fsyncs the file and its directory (checkpoints: the rename must survive a
    power cut, not only a crash of this process).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_name(path)
    try:
        with open(tmp, "wb") as f:
            write(f)
            if durable:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if durable:
        _fsync_dir(path.parent)
    return path


def atomic_write_text(path: str | Path, text: str) -> Path:
    return atomic_write(path, lambda f: f.write(text.encode()))


def atomic_write_json(path: str | Path, obj: Any) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=2))


def atomic_torch_save(obj: Any, path: str | Path, *, durable: bool = False) -> Path:
    return atomic_write(path, lambda f: torch.save(obj, f), durable=durable)


#: The documented opt-in to unpickle a file that needs more than weights (it may run any code).
TRUST_ENV = "VFM_TRUST_CHECKPOINTS"


class UntrustedFileError(ConfigError):
    """A file whose unpickling would import or call code; refused before any of it runs."""


class UnreadableFileError(ValueError):
    """A file that is not a PyTorch checkpoint, or a damaged one; the message names it."""


def _rng_state_globals() -> list[Any]:
    """What `np.random.get_state()` pickles to besides plain types: a uint32 ndarray. (Python's
    `random.getstate()` is tuples of ints; torch's generator states are tensors.)"""
    multiarray = getattr(np, "_core", None) or np.core  # numpy >= 2 renamed np.core
    reconstruct = multiarray.multiarray._reconstruct
    # the dtype's class is not a global of the pickle but must be allowed to restore its state
    return [np.ndarray, np.dtype, np.dtypes.UInt32DType,
            # _reconstruct under both names: pickles written with numpy 2.x and with numpy 1.x
            (reconstruct, "numpy._core.multiarray._reconstruct"), (reconstruct, "numpy.core.multiarray._reconstruct")]


def trust_checkpoints() -> bool:
    return os.environ.get(TRUST_ENV, "").strip().lower() in ("1", "true", "yes")


def _check_torch_file(path: Path) -> None:
    # torch.save writes a zip archive (legacy files: a pickle, protocol >= 2); anything else would
    # end in a cryptic unpickling error ("could not find MARK")
    with open(path, "rb") as f:
        head = f.read(16)
    if not (head.startswith(b"PK\x03\x04") or head.startswith(b"\x80")):
        what = "it is empty" if not head else f"torch.save writes a zip archive, this file begins with {head!r}"
        raise UnreadableFileError(f"{path} is not a PyTorch checkpoint: {what}")


def load_torch(path: str | Path, *, map_location: str | torch.device = "cpu") -> Any:
    """`torch.load(path, weights_only=True)`, with the RNG-state globals of our own checkpoints
    allowed.

    A file that needs anything else (a pickled class or function: code) raises
    `UntrustedFileError`, one line naming the file, the global and the opt-in, before any of it
    runs; with `VFM_TRUST_CHECKPOINTS=1` it is loaded in full, with a warning. A file that is not
    a PyTorch checkpoint, or a damaged one, raises `UnreadableFileError`, one line naming it.
    """
    path = Path(path)
    _check_torch_file(path)
    try:
        with torch.serialization.safe_globals(_rng_state_globals()):
            return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        refused = re.search(r"GLOBAL (\S+)", str(e))
        if refused is None:  # a damaged pickle, not a refusal: the unpickler's own words
            detail = re.search(r"WeightsUnpickler error:\s*(.+)", str(e))
            raise UnreadableFileError(f"could not read {path}: {detail.group(1) if detail else 'a damaged pickle'}") from None
        if not trust_checkpoints():
            raise UntrustedFileError(
                f"refused to load {path}: unpickling it would import or call {refused.group(1)}, i.e. run code "
                f"from the file; if you trust its source, set {TRUST_ENV}=1 (see docs/reliability.md)") from None
    except Exception as e:  # noqa: BLE001 - a damaged file fails in many ways: each gets one line naming it
        raise UnreadableFileError(f"could not read {path}: {_first_line(e)}") from e
    log.warning("%s=1: loading %s with full unpickling (it imports %s and may run any code)",
                TRUST_ENV, path, refused.group(1))
    return torch.load(path, map_location=map_location, weights_only=False)


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__
