"""The code's layout: import arrows point one way, and nothing below the entry points imports one.

Every import counts: at the top of a module, inside a function, and under ``if TYPE_CHECKING``."""
from __future__ import annotations

import ast

from conftest import ROOT

ENTRY_POINTS = {"train", "sample", "evaluate", "convert", "app", "plot", "toy2d"}


def project_modules() -> dict[str, list[str]]:
    """Each module of the repository (top level and bench/) -> the project modules it imports."""
    files = {p.stem: p for p in ROOT.glob("*.py")} | {f"bench.{p.stem}": p for p in (ROOT / "bench").glob("*.py")}
    local = {name.split(".")[-1] for name in files}
    graph = {}
    for name, path in files.items():
        imported = []
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                imported += [alias.name.split(".")[0] for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                imported.append(node.module.split(".")[0])
        own = name.split(".")[-1]
        graph[name] = sorted({m for m in imported if m in local and m != own})
    return graph


def cycles(graph: dict[str, list[str]]) -> list[list[str]]:
    """Every import cycle among the top-level modules (bench scripts import them but are never imported)."""
    found, state = [], {}

    def visit(node: str, path: list[str]) -> None:
        state[node] = "open"
        for nxt in graph.get(node, []):
            if state.get(nxt) == "open":
                found.append(path[path.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = "done"

    for node in graph:
        if node not in state:
            visit(node, [node])
    return found


def test_the_cycle_finder_finds_a_cycle():
    assert cycles({"a": ["b"], "b": ["c"], "c": ["a"], "d": ["a"]}) == [["a", "b", "c", "a"]]
    assert cycles({"a": ["b"], "b": [], "c": ["a", "b"]}) == []


def test_no_import_cycles():
    graph = {name: deps for name, deps in project_modules().items() if "." not in name}
    assert cycles(graph) == []


def test_nothing_below_the_entry_points_imports_one():
    offenders = {name: sorted(set(deps) & ENTRY_POINTS) for name, deps in project_modules().items()
                 if name not in ENTRY_POINTS and set(deps) & ENTRY_POINTS}
    assert offenders == {}


def test_entry_points_never_import_each_other():
    offenders = {name: sorted(set(deps) & ENTRY_POINTS) for name, deps in project_modules().items()
                 if name in ENTRY_POINTS and set(deps) & ENTRY_POINTS}
    assert offenders == {}
