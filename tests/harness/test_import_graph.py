"""Layers point one way: no import cycle among the modules of ``bridge/``.

The graph is read with :mod:`ast`, so every import counts: module-level ones, the
deferred ones inside functions and those under ``if TYPE_CHECKING:``. A cycle that
only exists through a deferred or type-only import is still a cycle in the design
(two layers that each know the other), so it fails here too.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

PACKAGE = "bridge"
ROOT = Path(__file__).resolve().parents[2] / PACKAGE


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def known_modules() -> dict[str, Path]:
    return {module_name(path): path for path in sorted(ROOT.rglob("*.py"))}


def resolve(name: str, modules: dict[str, Path]) -> str | None:
    """The module of ``bridge`` that ``name`` (a module or a name in one) lands in."""
    while name:
        if name in modules:
            return name
        name = name.rpartition(".")[0]
    return None


def imported_names(module: str, path: Path) -> Iterator[str]:
    """Every absolute dotted name that ``module`` imports, wherever the import is."""
    is_package = path.name == "__init__.py"
    package = module if is_package else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                prefix = ".".join([*base, *([node.module] if node.module else [])])
            else:
                prefix = node.module or ""
            # ``from bridge.x import y``: bridge.x.y if that is a module, else bridge.x (see
            # resolve: the longest dotted prefix that is a module)
            for alias in node.names:
                yield f"{prefix}.{alias.name}"


def import_graph() -> dict[str, set[str]]:
    modules = known_modules()
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        for imported in imported_names(name, path):
            if not imported.startswith(PACKAGE):
                continue
            target = resolve(imported, modules)
            if target is not None and target != name:
                graph[name].add(target)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), each
    shown as one concrete cycle through its modules."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for succ in sorted(graph[node]):
            if succ not in index:
                visit(succ)
                low[node] = min(low[node], low[succ])
            elif succ in on_stack:
                low[node] = min(low[node], index[succ])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                components.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return [one_cycle(graph, set(component)) for component in components]


def one_cycle(graph: dict[str, set[str]], component: set[str]) -> list[str]:
    """A shortest cycle through the first module of a strongly connected component."""
    start = min(component)
    paths = {start: [start]}
    frontier = [start]
    while frontier:
        following = []
        for node in frontier:
            for succ in sorted(graph[node] & component):
                if succ == start:
                    return [*paths[node], start]
                if succ not in paths:
                    paths[succ] = [*paths[node], succ]
                    following.append(succ)
        frontier = following
    raise AssertionError(f"not a cycle: {sorted(component)}")


def test_no_import_cycle_among_bridge_modules() -> None:
    found = cycles(import_graph())
    assert not found, "import cycles among bridge modules:\n" + "\n".join(
        "  " + " -> ".join(cycle) for cycle in found
    )


def reachable(graph: dict[str, set[str]], start: str) -> set[str]:
    """Every module ``start`` imports, directly or through others."""
    seen: set[str] = set()
    todo = [start]
    while todo:
        for imported in graph[todo.pop()]:
            if imported not in seen:
                seen.add(imported)
                todo.append(imported)
    return seen


@pytest.mark.parametrize(
    ("lower", "never"),
    [
        # the wire format knows no source: resources describe their own event data
        ("bridge.cloudevents", ("bridge.sources",)),
        # the foundations know nothing above them
        ("bridge.aio", ("bridge.",)),
        ("bridge.jsonable", ("bridge.",)),
        ("bridge.events", ("bridge.",)),
        ("bridge.tls", ("bridge.service", "bridge.sources", "bridge.sinks", "bridge.connections")),
        # the bridge registers its readiness with its telemetry, not the other way round
        ("bridge.telemetry", ("bridge.service.runner", "bridge.service.delivery", "bridge.ha")),
        # the supervisor is the top of the service: only the command line runs it
        ("bridge.service.factories", ("bridge.service.runner", "bridge.ha")),
        ("bridge.ha", ("bridge.service.runner", "bridge.service.factories")),
        ("bridge.sinks", ("bridge.service.runner", "bridge.service.delivery", "bridge.ha")),
        ("bridge.consumer", ("bridge.service.runner", "bridge.service.delivery", "bridge.ha")),
    ],
)
def test_layers_point_one_way(lower: str, never: tuple[str, ...]) -> None:
    graph = import_graph()
    modules = [m for m in graph if m == lower or m.startswith(lower + ".")]
    assert modules, f"no module {lower}"
    wrong = sorted(
        f"{module} -> {reached}"
        for module in modules
        for reached in reachable(graph, module)
        if reached.startswith(never)
    )
    assert not wrong, "imports against the layering:\n  " + "\n  ".join(wrong)


def test_the_scan_sees_every_kind_of_import(tmp_path: Path) -> None:
    # the scanner itself: relative, deferred and TYPE_CHECKING imports all count
    source = (
        "from typing import TYPE_CHECKING\n"
        "from . import sibling\n"
        "from ..top import name\n"
        "if TYPE_CHECKING:\n"
        "    from bridge.typed import T\n"
        "def f():\n"
        "    import bridge.deferred\n"
    )
    path = tmp_path / "mod.py"
    path.write_text(source)
    names = set(imported_names("bridge.pkg.mod", path))
    assert {"bridge.pkg.sibling", "bridge.top.name", "bridge.typed.T", "bridge.deferred"} <= names


@pytest.mark.parametrize(
    ("graph", "expected"),
    [
        ({"a": {"b"}, "b": set()}, []),
        ({"a": {"b"}, "b": {"c"}, "c": {"a"}}, [["a", "b", "c", "a"]]),
        ({"a": {"b"}, "b": {"a"}, "c": {"c"}}, [["a", "b", "a"]]),
    ],
)
def test_cycles_are_found_and_shown(graph: dict[str, set[str]], expected: list[list[str]]) -> None:
    assert cycles(graph) == expected
