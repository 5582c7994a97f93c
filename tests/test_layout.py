"""The package's layers only point down: its import graph has no cycle, and no function-local import of a
cimconvert module hides one.

The graph is read with ``ast`` (nothing is imported): a module imports every cimconvert module named by
an ``import`` or ``from ... import`` at module level (inside a module-level ``if``/``try`` too), relative
imports resolved; ``from package import name`` counts as importing ``package.name`` when that is a module
and ``package`` otherwise; importing a module also runs its packages' ``__init__`` (so re-exports count),
except the packages the importer itself lives in, which Python has already started.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "cimconvert"
ROOT = PACKAGE.name
#: Files whose local import is removed by a parallel change of issue #11 (the adapters' registration in
#: arch/); delete the entry when that lands. Anything else is reported.
PENDING = {"cimconvert/arch/registry.py"}


def _module_files() -> dict[str, Path]:
    """Dotted module name → file, for every module of the package (``pkg/__init__.py`` → ``pkg``)."""
    modules = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        modules[".".join(parts)] = path
    return modules


MODULES = _module_files()


def _package_of(module: str) -> str:
    """The package a module's relative imports start from."""
    return module if MODULES[module].name == "__init__.py" else module.rpartition(".")[0]


def _known(name: str) -> str:
    """``name`` or its closest enclosing module of the package (``pkg.mod.func`` → ``pkg.mod``)."""
    while name not in MODULES:
        name = name.rpartition(".")[0]
    return name


def imported_modules(node: ast.stmt, module: str) -> list[str]:
    """The package modules one import statement names (empty for other imports and statements)."""
    if isinstance(node, ast.Import):
        return [_known(a.name) for a in node.names if a.name.split(".")[0] == ROOT]
    if not isinstance(node, ast.ImportFrom):
        return []
    if node.level:
        base = _package_of(module).split(".")
        base = base[: len(base) - node.level + 1]
        source = ".".join([*base, *([node.module] if node.module else [])])
    else:
        source = node.module or ""
    if source.split(".")[0] != ROOT:
        return []
    return [f"{source}.{a.name}" if f"{source}.{a.name}" in MODULES else _known(source) for a in node.names]


def _with_packages(target: str, importer: str) -> Iterator[str]:
    """``target`` and the package ``__init__`` modules importing it runs (not the importer's own)."""
    parts = target.split(".")
    for end in range(2, len(parts) + 1):
        name = ".".join(parts[:end])
        if not (importer == name or importer.startswith(f"{name}.")):
            yield name


def _module_level(body: list[ast.stmt]) -> Iterator[ast.stmt]:
    """Statements run at import: the module body, including the branches of module-level if/try blocks."""
    for node in body:
        yield node
        if isinstance(node, (ast.If, ast.Try)):
            handlers = [stmt for handler in getattr(node, "handlers", []) for stmt in handler.body]
            yield from _module_level([*node.body, *node.orelse, *handlers, *getattr(node, "finalbody", [])])


def import_graph() -> dict[str, set[str]]:
    """Module → the package modules it imports at module level."""
    graph: dict[str, set[str]] = {}
    for module, path in MODULES.items():
        edges = graph.setdefault(module, set())
        for node in _module_level(ast.parse(path.read_text(encoding="utf-8")).body):
            for target in imported_modules(node, module):
                edges.update(_with_packages(target, module))
        edges.discard(module)
    return graph


def local_import_lines(source: str, module: str) -> list[int]:
    """Lines of ``source`` (module ``module``) importing a package module below module level."""
    tree = ast.parse(source)
    top = set(map(id, _module_level(tree.body)))
    return [
        node.lineno
        for node in ast.walk(tree)
        if id(node) not in top and isinstance(node, ast.stmt) and imported_modules(node, module)
    ]


def local_imports() -> list[str]:
    """``file:line`` of every import of a package module that is not at module level."""
    return [
        f"{path.relative_to(PACKAGE.parent)}:{line}"
        for module, path in MODULES.items()
        for line in local_import_lines(path.read_text(encoding="utf-8"), module)
    ]


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for succ in sorted(graph[node]):
            if succ not in index:
                visit(succ)
                low[node] = min(low[node], low[succ])
            elif succ in stack:
                low[node] = min(low[node], index[succ])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_graph_reader_sees_imports() -> None:
    """The reader finds known edges (absolute, ``from pkg import module``, package ``__init__``)."""
    graph = import_graph()
    assert "cimconvert.bundle.reader" in graph["cimconvert.api"]
    assert "cimconvert.transforms" in graph["cimconvert.bundle.reader"]
    assert "cimconvert.methods.hpd" in graph["cimconvert.methods"]
    # importing a submodule runs its package __init__ too
    assert "cimconvert.methods" in graph["cimconvert.analysis"]


def test_cycle_finder_finds_a_cycle() -> None:
    """The check itself can fail: a two-module loop and a three-module loop are reported."""
    graph = {"a": {"b"}, "b": {"a"}, "c": {"d"}, "d": {"e"}, "e": {"c"}, "f": {"a"}}
    assert sorted(cycles(graph)) == [["a", "b"], ["c", "d", "e"]]


def test_local_import_finder_finds_one() -> None:
    """Imports inside functions (also under a module-level ``if``) are found; module-level ones are not."""
    source = (
        "import json\n"
        "from cimconvert.errors import CimError\n"
        "try:\n    from cimconvert import api\nexcept ImportError:\n    api = None\n"
        "def f():\n    from cimconvert.placement import plan_model\n"
        "if True:\n    def g():\n        from . import checkpoint\n"
    )
    assert local_import_lines(source, "cimconvert.api") == [8, 11]


@pytest.mark.parametrize("check", ["cycles", "local imports"])
def test_layers_only_point_down(check: str) -> None:
    """No import cycle in the package, and no function-local import of a cimconvert module."""
    if check == "cycles":
        assert cycles(import_graph()) == []
    else:
        assert [where for where in local_imports() if where.partition(":")[0] not in PENDING] == []
