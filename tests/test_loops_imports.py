"""``loops/`` on one floor: its modules import each other without a cycle (lazy imports too)."""

from __future__ import annotations

import ast
from pathlib import Path

import networkx as nx

LOOPS = Path(__file__).resolve().parents[1] / "nestlearn" / "loops"


def _imports(path: Path) -> set[str]:
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            if node.module == "nestlearn.loops":  # from nestlearn.loops import dual, ...
                out |= {f"nestlearn.loops.{a.name}" for a in node.names if (LOOPS / f"{a.name}.py").exists()}
            elif node.module.startswith("nestlearn.loops."):
                out.add(node.module)
        elif isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.startswith("nestlearn.loops.")}
    return out


def test_loops_modules_have_no_import_cycle() -> None:
    graph = nx.DiGraph()
    for path in LOOPS.glob("*.py"):
        if path.stem != "__init__":
            name = f"nestlearn.loops.{path.stem}"
            graph.add_node(name)
            graph.add_edges_from((name, dep) for dep in _imports(path))
    assert list(nx.simple_cycles(graph)) == []

