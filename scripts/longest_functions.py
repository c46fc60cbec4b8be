"""The N longest functions (default 10) and the files over 400 lines under a folder (default src/).

    python scripts/longest_functions.py [N] [FOLDER]        # prints `path:line name length`
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

FILE_LIMIT = 400
FUNCTION = (ast.FunctionDef, ast.AsyncFunctionDef)


def functions(path: Path) -> list[tuple[int, str, int]]:
    """(line, qualified name, length in lines) of every function and method in `path`, nested ones too."""
    found: list[tuple[int, str, int]] = []

    def visit(node: ast.AST, prefix: str) -> None:
        for child in ast.iter_child_nodes(node):
            name = f"{prefix}{getattr(child, 'name', '')}"
            if isinstance(child, FUNCTION):
                found.append((child.lineno, name, child.end_lineno - child.lineno + 1))
            visit(child, f"{name}." if isinstance(child, (*FUNCTION, ast.ClassDef)) else prefix)

    visit(ast.parse(path.read_text(), str(path)), "")
    return found


if __name__ == "__main__":
    n, root = int(sys.argv[1]) if len(sys.argv) > 1 else 10, Path(sys.argv[2] if len(sys.argv) > 2 else "src")
    files = sorted(root.rglob("*.py"))
    ranked = sorted(((length, f"{p}:{line}", name) for p in files for line, name, length in functions(p)), reverse=True)
    print("\n".join(f"{where} {name} {length}" for length, where, name in ranked[:n]))
    sizes = sorted(((len(p.read_text().splitlines()), p) for p in files), reverse=True)
    print(f"files over {FILE_LIMIT} lines:", *[f"{p} {lines}" for lines, p in sizes if lines > FILE_LIMIT], sep="\n")
