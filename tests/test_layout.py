"""The package's shape: data flows one way, so its modules import each other without a
cycle (imports inside functions count: they only defer one)."""

from __future__ import annotations

import ast
from graphlib import CycleError, TopologicalSorter
from pathlib import Path

import landscape

PACKAGE = Path(landscape.__file__).parent


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_names(path: Path) -> set[str]:
    """Every dotted name an ``import`` or ``from ... import`` anywhere in the file names."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names |= {node.module} | {f"{node.module}.{alias.name}" for alias in node.names}
    return names


def import_graph() -> dict[str, set[str]]:
    """Each package module -> the package modules it imports."""
    files = {module_name(path): path for path in PACKAGE.rglob("*.py")}
    return {
        module: (imported_names(path) & files.keys()) - {module} for module, path in files.items()
    }


def test_no_module_imports_another_that_imports_it_back():
    graph = import_graph()
    assert "landscape.slurm" in graph["landscape.cli"]  # the graph sees imports in functions
    try:
        tuple(TopologicalSorter(graph).static_order())
    except CycleError as cycle:
        raise AssertionError(f"import cycle: {' -> '.join(cycle.args[1])}") from None


def test_the_package_never_imports_the_benchmarks():
    for path in PACKAGE.rglob("*.py"):
        assert not any(name.split(".")[0] == "benchmarks" for name in imported_names(path)), path
