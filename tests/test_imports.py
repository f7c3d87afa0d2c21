"""Imports run one way: the graph of nodeseg's modules importing one another has no cycle.

Every ``import nodeseg.x`` / ``from nodeseg.x import y`` / relative import in every module of the package is an
edge, wherever it stands: at module level, and also inside a function (a lazy import still ties the two modules
together, and a circle through one only fails later, at the call). Imports under ``if TYPE_CHECKING:`` never run
and are left out. ``from nodeseg.a import b`` is an edge to the module ``nodeseg.a.b`` where that is a module,
else to ``nodeseg.a``; the parent packages Python runs first are not edges of their own.
"""

from __future__ import annotations

import ast
import importlib
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "nodeseg"


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imports(tree: ast.AST) -> list[ast.Import | ast.ImportFrom]:
    found: list[ast.Import | ast.ImportFrom] = []

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import | ast.ImportFrom):
            found.append(node)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return found


def _edges(name: str, path: Path) -> set[str]:
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out: set[str] = set()
    for node in _imports(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        else:
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base for a in node.names]
        out |= {t for t in targets if t in MODULES and t != name}
    return out


GRAPH = {name: _edges(name, path) for name, path in MODULES.items()}


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of ``graph`` as a path (first == last), or None."""
    state: dict[str, int] = {}  # 1 on the stack, 2 done
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return [*stack[stack.index(nxt):], nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_the_graph_is_read() -> None:
    assert len(MODULES) > 50
    assert "nodeseg.kube.job" in GRAPH["nodeseg.kube.launcher"]  # module level
    assert "nodeseg.stages.preprocess" in GRAPH["nodeseg.cli"]  # inside a function


def test_the_cycle_finder_finds_a_cycle() -> None:
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None


def test_nodeseg_imports_have_no_cycle() -> None:
    cycle = _cycle(GRAPH)
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


@pytest.mark.parametrize("name", ["nodeseg.kube.launcher", "nodeseg.kube.validate", "nodeseg.kube.pytorchjob",
                                  "nodeseg.models.unet", "nodeseg.models.registry"])
def test_each_side_of_a_former_circle_imports_first_on_its_own(name: str) -> None:
    """A fresh interpreter imports the module first (no other nodeseg module loaded before it)."""
    done = subprocess.run([sys.executable, "-c", f"import {name}"], cwd=REPO, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]


def test_every_module_imports() -> None:
    for name in MODULES:
        if name.startswith("nodeseg.kube") or name == "nodeseg.__main__":
            continue  # the kube extra is tested above; __main__ runs the CLI
        importlib.import_module(name)
