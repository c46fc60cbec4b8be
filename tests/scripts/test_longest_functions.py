"""scripts/longest_functions.py: the longest functions (nested and methods included) and the long files."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "longest_functions.py"


def test_ranks_functions_and_lists_long_files(tmp_path: Path) -> None:
    body = "\n".join(f"    x{i} = {i}" for i in range(450))
    (tmp_path / "long.py").write_text(f"def long():\n{body}\n")
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "small.py").write_text(
        "class A:\n    def method(self):\n        def inner():\n            return 1\n        return inner\n"
    )
    out = subprocess.run([sys.executable, str(SCRIPT), "2", str(tmp_path)], capture_output=True, text=True,
                         check=True).stdout.splitlines()
    assert out[0] == f"{tmp_path / 'long.py'}:1 long 451"
    assert out[1] == f"{tmp_path / 'pkg' / 'small.py'}:2 A.method 4"
    assert out[2:] == ["files over 400 lines:", f"{tmp_path / 'long.py'} 451"]
