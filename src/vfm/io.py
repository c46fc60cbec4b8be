"""Atomic file writes: the one way this package puts a file in place.

A reader (a resumed run, another rank, a sweep summariser) sees either the previous file or the
complete new one, never a torn one: the bytes go to a temporary file in the same directory, which
`os.replace` then renames over the target. The temporary name is `.<name>.tmp-<pid>`, so a file
left by a process killed mid-write is recognisable and never mistaken for a
result (`vfm.engine.checkpoint.remove_stale_temporaries` deletes such files).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

import torch


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
