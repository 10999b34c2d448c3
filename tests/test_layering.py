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


def _unexplained_imports(path: Path, root: Path = ROOT) -> list[str]:
    """Function-level imports with no reason: none on the line, none above the import run, no ImportError guard."""
    lines = path.read_text().splitlines()
    tree = ast.parse("\n".join(lines), str(path))
    guarded = {n.lineno for t in ast.walk(tree) if isinstance(t, ast.Try)
               and any(isinstance(h.type, ast.Name) and h.type.id in ("ImportError", "ModuleNotFoundError")
                       for h in t.handlers)
               for n in ast.walk(t) if isinstance(n, (ast.Import, ast.ImportFrom))}
    out = []
    for fn in ast.walk(tree):
        if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        for node in ast.walk(fn):
            if not isinstance(node, (ast.Import, ast.ImportFrom)) or node.lineno in guarded:
                continue
            span = lines[node.lineno - 1:node.end_lineno]
            j = node.lineno - 2  # walk up over the rest of this import run and blank lines
            while j >= 0 and (lines[j].strip() == "" or lines[j].lstrip().startswith(("import ", "from "))):
                span.append(lines[j])
                j -= 1
            if not any("#" in s for s in span) and not (j >= 0 and lines[j].lstrip().startswith("#")):
                out.append(f"{path.relative_to(root)}:{node.lineno} {lines[node.lineno - 1].strip()}")
    return out


def test_imports_inside_functions_in_the_inner_rooms_say_why():
    """Top-level imports show a module's place; a lazy one is kept only for start-up time or a load-time
    circle, with that reason in a comment (on the line or above the import run)."""
    found = [hit for room in INNER for f in sorted((ROOT / room).glob("*.py")) for hit in _unexplained_imports(f)]
    assert found == [], "move these imports to the top of the module, or say in a comment why they are lazy"


def test_the_reason_check_finds_a_bare_lazy_import(tmp_path):
    f = tmp_path / "probe.py"
    f.write_text("def a():\n    import json\n\n\ndef b():\n    import gguf  # 0.3 s\n\n\n"
                 "def c():\n    try:\n        import torch\n    except ImportError:\n        pass\n")
    assert _unexplained_imports(f, tmp_path) == ["probe.py:2 import json"]
