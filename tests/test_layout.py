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


def reachable(graph: dict[str, set[str]], start: str) -> set[str]:
    """Every package module that importing ``start`` imports, directly or not."""
    seen, stack = set(), [start]
    while stack:
        for name in graph[stack.pop()] - seen:
            seen.add(name)
            stack.append(name)
    return seen


# What curvature math must never depend on: an experiment, a config, a file, a job.
ABOVE_THE_MATH = {
    f"landscape.{name}"
    for name in (
        "checkpoint",
        "cli",
        "config",
        "data",
        "directions",
        "experiment",
        "hessian",
        "jobs",
        "parts",
        "plan",
        "reduce",
        "slurm",
        "store",
        "trace",
        "work_table",
        "workers",
    )
}


def test_curvature_math_knows_no_experiment_config_or_file():
    graph = import_graph()
    for module in (name for name in graph if name.startswith("landscape.curvature")):
        upward = reachable(graph, module) & ABOVE_THE_MATH
        assert not upward, f"{module} imports {', '.join(sorted(upward))}"
