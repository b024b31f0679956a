"""The module graph: every medres module imports on its own, and no two modules import each other,
directly or around a circle, at the top level or inside a function (a deferred import is still a
dependency: it only hides the circle until the function runs)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

from helpers import ROOT  # noqa: E402
PACKAGE = ROOT / "medres"


def modules() -> dict[str, Path]:
    out = {}
    for p in sorted(PACKAGE.rglob("*.py")):
        parts = p.relative_to(ROOT).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = p
    return out


def imports_of(path: Path, name: str, known: set[str]) -> set[str]:
    """medres modules `path` imports anywhere in its body (a package import counts as its __init__)."""
    found = set()
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            found.add(base)
            found |= {f"{base}.{a.name}" for a in node.names}
    return {m for m in found if m in known and m != name}


def test_no_import_cycle():
    mods = modules()
    graph = {m: imports_of(p, m, set(mods)) for m, p in mods.items()}
    # a submodule importing its own package's __init__ (e.g. medres.io.load → medres.io) is how Python works, not a circle
    graph = {m: {d for d in deps if not m.startswith(d + ".")} for m, deps in graph.items()}
    state: dict[str, int] = {}
    cycles = []

    def visit(m: str, stack: list[str]) -> None:
        state[m] = 1
        for d in sorted(graph[m]):
            if state.get(d) == 1:
                cycles.append(stack[stack.index(d):] + [d] if d in stack else [m, d])
            elif d not in state:
                visit(d, stack + [d])
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])
    assert not cycles, "import cycles: " + "; ".join(" → ".join(c) for c in cycles)


def test_every_module_imports_on_its_own():
    code = (
        "import importlib, sys\n"
        f"names = {sorted(modules())!r}\n"
        "for n in [n for n in names if not n.endswith('__main__')]:\n"
        "    for k in [k for k in sys.modules if k == 'medres' or k.startswith('medres.')]:\n"
        "        del sys.modules[k]\n"
        "    importlib.import_module(n)\n"
        "print('ok', len(names))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and done.stdout.startswith("ok"), done.stderr[-2000:]


def test_one_decoding_pool():
    """The scoring path and the image store decode through medres.data.pool; neither starts threads
    or processes of its own."""
    mods = modules()
    for name in ("medres.scoring", "medres.data.store"):
        deps = imports_of(mods[name], name, set(mods) | {"multiprocessing", "concurrent.futures", "threading"})
        assert "medres.data.pool" in deps, name
        assert not deps & {"multiprocessing", "concurrent.futures", "threading"}, f"{name} starts its own pool: {deps}"


def test_no_function_over_80_lines():
    """Issue 24's bound on one function's size (decorators excluded, docstring included)."""
    long = []
    for name, path in modules().items():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno + 1 > 80:
                long.append(f"{name}.{node.name} ({node.end_lineno - node.lineno + 1} lines)")
    assert not long, "functions over 80 lines: " + ", ".join(long)
