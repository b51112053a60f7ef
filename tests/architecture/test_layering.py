"""The layout shows the architecture: no import cycles inside gateway/ or client/,
and nothing private is taken from a gateway front-end. (The direction of the
gateway's layers is tests/gateway/test_gateway_layout.py's.)

Every import counts, including one inside a function (a lazy import is still
a dependency, only hidden); only imports under ``if TYPE_CHECKING:`` are
left out, as they are the data model's type-only back-references and never
run. The graph is read from the source with ``ast``, so a cycle fails here
before it can become an import-order bug.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[2] / "src"
PACKAGES = ("tether.gateway", "tether.client")


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imports(path: Path, module: str) -> set[str]:
    """Every module `module` imports at run time (absolute names)."""
    tree = ast.parse(path.read_text(), str(path))
    found: set[str] = set()
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]

    def visit(node: ast.AST) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _is_type_checking(child.test):
                for orelse in child.orelse:
                    visit(orelse)
                continue
            if isinstance(child, ast.Import):
                found.update(alias.name for alias in child.names)
            elif isinstance(child, ast.ImportFrom):
                base = child.module or ""
                if child.level:
                    parent = package.split(".")
                    parent = parent[: len(parent) - (child.level - 1)]
                    base = ".".join([*parent, base] if base else parent)
                found.add(base)
                # `from pkg import mod` imports the module pkg.mod
                found.update(f"{base}.{alias.name}" for alias in child.names)
            visit(child)

    visit(tree)
    return found


def _graph() -> dict[str, set[str]]:
    files = {_module_name(p): p for p in SRC.joinpath("tether").rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in files.items():
        if not name.startswith(PACKAGES) or "._pb" in name:
            continue
        graph[name] = {m for m in _imports(path, name) if m in files and m != name}
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def connect(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph.get(node, ())):
            if nxt not in graph:
                continue  # outside the packages checked: cannot close a cycle here
            if nxt not in index:
                connect(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            connect(node)
    return found


def test_graph_is_read() -> None:
    graph = _graph()
    # The checker must see the packages and their edges, or it proves nothing.
    assert any(name.startswith("tether.gateway.") for name in graph)
    assert any(name.startswith("tether.client.") for name in graph)
    assert sum(len(edges) for edges in graph.values()) > 10


@pytest.mark.parametrize(
    ("graph", "expected"),
    [
        ({"a": {"b"}, "b": {"a"}}, [["a", "b"]]),
        ({"a": {"b"}, "b": {"c"}, "c": {"a"}}, [["a", "b", "c"]]),
        ({"a": {"b"}, "b": set()}, []),
    ],
)
def test_cycle_finder(graph: dict[str, set[str]], expected: list[list[str]]) -> None:
    assert _cycles(graph) == expected


def test_lazy_import_counts(tmp_path: Path) -> None:
    source = tmp_path / "m.py"
    source.write_text(
        "from typing import TYPE_CHECKING\n"
        "if TYPE_CHECKING:\n    from tether.x import y\n"
        "def f():\n    from tether.z import w\n"
    )
    found = _imports(source, "tether.m")
    assert "tether.z" in found and "tether.z.w" in found
    assert "tether.x" not in found


def test_no_import_cycles() -> None:
    cycles = _cycles(_graph())
    assert not cycles, "import cycles (every import counts but TYPE_CHECKING ones): " + "; ".join(
        " <-> ".join(c) for c in cycles
    )


def test_nothing_private_is_imported_from_a_front_end() -> None:
    private: list[str] = []
    for path in SRC.joinpath("tether").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if (
                isinstance(node, ast.ImportFrom)
                and (node.module or "").startswith("tether.gateway.frontends")
                and any(alias.name.startswith("_") for alias in node.names)
            ):
                private.append(f"{path.name}: from {node.module} import ...")
    assert not private
