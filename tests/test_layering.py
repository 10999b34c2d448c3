"""The rooms import downward only: the master, model and formats never reach the CLI, the HTTP API or the TUI.

Two checks: a fresh interpreter that imports tpi.master (and every module of the three inner rooms)
holds none of the outer modules afterwards, and no import statement in those rooms, at module level
or inside a function, names one (a lazy import would escape the first check).
"""
from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
INNER = ("tpi/master", "tpi/model", "tpi/formats")
# The outer layer: tpi's own CLI and serving packages and the libraries only they use.
OUTER = ("tpi.cli", "tpi.serve", "typer", "fastapi", "starlette", "uvicorn", "httpx", "rich")


def _is_outer(module: str) -> bool:
    return any(module == o or module.startswith(o + ".") for o in OUTER)


def _inner_modules() -> list[str]:
    names = []
    for room in INNER:
        for f in sorted((ROOT / room).glob("*.py")):
            pkg = "tpi." + room.split("/", 1)[1]
            names.append(pkg if f.stem == "__init__" else f"{pkg}.{f.stem}")
    return names


@pytest.mark.parametrize("imports", [["tpi.master"], _inner_modules()], ids=["tpi.master", "all-inner"])
def test_importing_the_inner_rooms_loads_nothing_outer(imports):
    code = ("import json, sys\n" + "".join(f"import {m}\n" for m in imports)
            + "print(json.dumps(sorted(sys.modules)))\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    loaded = json.loads(r.stdout.strip().splitlines()[-1])
    assert "tpi.master" in loaded  # the check ran on the real package
    assert [m for m in loaded if _is_outer(m)] == []


def test_no_import_statement_in_the_inner_rooms_names_the_outer_layer():
    found = []
    for room in INNER:
        for f in sorted((ROOT / room).glob("*.py")):
            for node in ast.walk(ast.parse(f.read_text(), str(f))):
                names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                         else [node.module or ""] if isinstance(node, ast.ImportFrom) and node.level == 0 else [])
                found += [f"{f.relative_to(ROOT)}:{node.lineno} {n}" for n in names if _is_outer(n)]
    assert found == []
    assert _is_outer("tpi.serve.api") and _is_outer("rich") and not _is_outer("tpi.master")  # the check can fail
