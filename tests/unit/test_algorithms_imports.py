"""The algorithms package's import graph: no cycles, nothing outside pure tensor math.

The graph is read from the source with ``ast`` and counts every import, including those
inside function bodies: a cycle closed by a deferred import (``config`` importing
``presets`` inside ``__post_init__`` while ``presets`` imported ``config`` inside a
function) works at run time, so importing the modules could never catch it. A fresh
interpreter then imports each module first, once.
"""

import ast
import subprocess
import sys
from pathlib import Path

import moe_rl.algorithms

PKG = "moe_rl.algorithms"
PKG_DIR = Path(moe_rl.algorithms.__file__).parent
MODULES = sorted(f"{PKG}.{p.stem}" for p in PKG_DIR.glob("*.py") if p.stem != "__init__")
# pure tensor math: no process groups, no Megatron, no other part of moe_rl
FORBIDDEN = ("torch.distributed", "megatron", "moe_rl.")


def _module_name(path: Path) -> str:
    return PKG if path.stem == "__init__" else f"{PKG}.{path.stem}"


def _imports(path: Path) -> set[str]:
    """Every module ``path`` imports anywhere in its body, as absolute dotted names."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: every module here sits directly in the package
                base = PKG.rsplit(".", node.level - 1)[0] if node.level > 1 else PKG
                mod = f"{base}.{node.module}" if node.module else base
            else:
                mod = node.module
            found.add(mod)
            # ``from moe_rl.algorithms import config`` names a submodule
            found.update(f"{mod}.{a.name}" for a in node.names if f"{mod}.{a.name}" in MODULES)
    return found


def _graph() -> dict[str, set[str]]:
    nodes = set(MODULES) | {PKG}
    return {_module_name(p): _imports(p) & nodes for p in PKG_DIR.glob("*.py")}


def _find_cycle(graph: dict[str, set[str]]) -> list[str]:
    """One cycle as [a, b, ..., a], or [] when the graph is acyclic (depth-first search)."""
    state: dict[str, int] = {}  # 1 on the current path, 2 done
    path: list[str] = []

    def visit(n: str) -> list[str]:
        state[n] = 1
        path.append(n)
        for m in sorted(graph.get(n, ())):
            if state.get(m) == 1:
                return path[path.index(m):] + [m]
            if m not in state and (c := visit(m)):
                return c
        path.pop()
        state[n] = 2
        return []

    for n in sorted(graph):
        if n not in state and (c := visit(n)):
            return c
    return []


def test_cycle_finder_finds_a_deferred_cycle():
    # the shape this package had: config -> presets at run time, presets -> config in a function
    assert _find_cycle({"config": {"presets"}, "presets": {"config"}}) == ["config", "presets", "config"]
    assert _find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) == []


def test_no_import_cycle_in_algorithms():
    graph = _graph()
    assert graph[f"{PKG}.config"] >= {f"{PKG}.presets"}  # the graph sees real edges
    assert _find_cycle(graph) == [], " -> ".join(_find_cycle(graph))


def test_presets_is_data_only():
    assert _graph()[f"{PKG}.presets"] == set()


def test_algorithms_import_nothing_distributed_or_from_the_rest_of_moe_rl():
    for p in PKG_DIR.glob("*.py"):
        bad = sorted(m for m in _imports(p) if m.startswith(FORBIDDEN) and not m.startswith(PKG))
        assert not bad, f"{p.name} imports {bad}"


def test_each_module_imports_first_in_a_fresh_interpreter():
    """One interpreter, ``moe_rl`` dropped from ``sys.modules`` before each module so that
    each is the first one imported (torch stays loaded: one start-up, not one per module)."""
    code = (
        "import sys, importlib\n"
        f"for name in {MODULES!r}:\n"
        "    for k in [k for k in sys.modules if k == 'moe_rl' or k.startswith('moe_rl.')]:\n"
        "        del sys.modules[k]\n"
        "    importlib.import_module(name)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
