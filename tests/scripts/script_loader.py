"""scripts/ is not a package: the tests here load the script they test with `load_script`."""

from __future__ import annotations

import importlib
import importlib.util
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

SCRIPTS = Path(__file__).resolve().parents[2] / "scripts"


def load_script(name: str) -> Iterator[ModuleType]:
    """Yield scripts/<name>.py imported as module `name`, or the folder scripts/<name>/ (a script
    run as `python scripts/<name>`) imported as package `name` with its `__main__` and the modules
    that imports, with scripts/ on sys.path for their own imports (bench imports bench_lightly);
    undone afterwards."""
    sys.path.insert(0, str(SCRIPTS))
    try:
        if (SCRIPTS / name).is_dir():
            importlib.import_module(f"{name}.__main__")
            yield sys.modules[name]
        else:
            spec = importlib.util.spec_from_file_location(name, SCRIPTS / f"{name}.py")
            module = importlib.util.module_from_spec(spec)
            sys.modules[name] = module
            spec.loader.exec_module(module)
            yield module
    finally:
        for loaded in [m for m in sys.modules if m == name or m.startswith(f"{name}.")]:
            sys.modules.pop(loaded)
        sys.path.remove(str(SCRIPTS))
