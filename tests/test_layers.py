"""Imports run downward only: store < analysis < figures < app < report/cli (and extractor -> store).

A module may import from its own room and the rooms below it, at module level or inside a function.
Checked on the source (AST), so a lazy upward import inside a function is caught too.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# room -> rank; a module of rank r may import rooms of rank <= r
RANKS = {
    "attnviz.errors": 0,
    "attnviz.store": 1,
    "attnviz.analysis": 2,
    "attnviz.figures": 3,
    "attnviz.app": 4,
    "attnviz.report": 5,
    "attnviz.cli": 6,
    "attnviz.__main__": 6,
}
# the cli runs the extractor (lazily); nothing else in attnviz may import it
EXTRACTOR_ALLOWED = {"attnviz.cli"}


def _room(module: str) -> str | None:
    for room in sorted(RANKS, key=len, reverse=True):
        if module == room or module.startswith(room + "."):
            return room
    return None


def _modules() -> list[tuple[str, Path]]:
    out = []
    for path in sorted((ROOT / "attnviz").rglob("*.py")):
        rel = path.relative_to(ROOT).with_suffix("")
        parts = list(rel.parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out.append((".".join(parts), path))
    return out


def _imports(path: Path) -> list[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    names = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.append(node.module)
    return names


@pytest.mark.parametrize("module,path", _modules(), ids=[m for m, _ in _modules()])
def test_imports_run_downward(module: str, path: Path) -> None:
    room = _room(module)
    if room is None:  # attnviz/__init__.py re-exports the reader: rank of store
        assert module == "attnviz"
        rank = RANKS["attnviz.store"]
    else:
        rank = RANKS[room]
    for name in _imports(path):
        if name.startswith("extractor"):
            assert room in EXTRACTOR_ALLOWED, f"{module} imports {name}: only the CLI may run the extractor"
            continue
        target = _room(name)
        if target is None:
            continue
        assert RANKS[target] <= rank, f"{module} ({room}) imports {name} ({target}), a room above it"


def test_the_check_sees_an_upward_import(tmp_path: Path) -> None:
    bad = tmp_path / "bad.py"
    bad.write_text("def f():\n    from attnviz.report import write_report\n", encoding="utf-8")
    assert "attnviz.report" in _imports(bad)
    assert RANKS[_room("attnviz.report")] > RANKS["attnviz.figures"]


def _module_graph() -> dict[str, set[str]]:
    mods = dict(_modules())
    graph: dict[str, set[str]] = {m: set() for m in mods}
    for m, path in mods.items():
        for name in _imports(path):
            # "from attnviz.analysis.patterns import atlas" names a module or a symbol of a package
            for cand in (name, name.rsplit(".", 1)[0]):
                if cand in mods and cand != m:
                    graph[m].add(cand)
                    break
    return graph


def test_no_import_cycles_between_modules() -> None:
    """No module imports (even lazily) a module that imports it back, directly or through others.
    A package's ``__init__`` re-exporting its own submodules is not a cycle."""
    graph = _module_graph()

    def is_reexport(a: str, b: str) -> bool:  # package a imports its own submodule b
        return b.startswith(a + ".")

    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for n in sorted(graph[m]):
            if is_reexport(m, n):
                continue
            if state.get(n) == 1:
                cycle = stack[stack.index(n):] + [n]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if n not in state:
                visit(n)
        stack.pop()
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m)
