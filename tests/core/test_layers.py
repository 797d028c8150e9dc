"""The package's layers: imports go down (core <- store <- integrations, cli, demo), never in a circle."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "otel_cancel"


def _modules() -> dict[str, Path]:
    found = {}
    for path in PACKAGE.rglob("*.py"):
        if "_examples" in path.parts:
            continue
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        found[name] = path
    return found


MODULES = _modules()


def _imports(name: str) -> set[str]:
    """Every otel_cancel module ``name`` imports, at the top or inside a function."""
    path = MODULES[name]
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    targets: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            submodules = [f"{module}.{alias.name}" for alias in node.names if f"{module}.{alias.name}" in MODULES]
            targets.update(submodules if len(submodules) == len(node.names) else [module, *submodules])
        elif isinstance(node, ast.Import):
            targets.update(alias.name for alias in node.names)
    return {target for target in targets if target in MODULES and target != name}


GRAPH = {name: _imports(name) for name in MODULES}


def _in(folder: str, name: str) -> bool:
    return name == f"otel_cancel.{folder}" or name.startswith(f"otel_cancel.{folder}.")


def test_no_module_imports_one_that_imports_it_back():
    """No import circles, however long (the graph has no strongly connected component beyond one module)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    circles: list[list[str]] = []

    def visit(name: str) -> None:
        index[name] = low[name] = len(index)
        stack.append(name)
        for target in GRAPH[name]:
            if target not in index:
                visit(target)
                low[name] = min(low[name], low[target])
            elif target in stack:
                low[name] = min(low[name], index[target])
        if low[name] == index[name]:
            component = []
            while True:
                member = stack.pop()
                component.append(member)
                if member == name:
                    break
            if len(component) > 1:
                circles.append(sorted(component))

    for name in GRAPH:
        if name not in index:
            visit(name)
    assert circles == []


@pytest.mark.parametrize(
    ("folder", "forbidden"),
    [
        ("_core", ("integrations", "cli", "demo", "testing")),
        ("store", ("integrations", "cli", "demo", "testing")),
        ("integrations", ("cli", "demo", "testing")),
        ("cli", ("integrations", "testing")),
        ("demo", ("integrations", "testing")),
    ],
)
def test_a_layer_never_imports_the_layers_above_it(folder, forbidden):
    """The core and the store know no integration, command or test support; commands know no integration."""
    crossing = sorted(
        f"{name} -> {target}"
        for name, targets in GRAPH.items()
        if _in(folder, name)
        for target in targets
        if any(_in(above, target) for above in forbidden)
    )
    assert crossing == []


def test_the_store_reaches_the_core_only_for_the_records_it_stores():
    """The store knows records (flags, receipts, bulk cancels, live work), not the machinery that acts on them."""
    machinery = ("scope", "registry", "watcher", "process_state", "outcome", "context_blocks", "cancel_many")
    crossing = sorted(
        f"{name} -> {target}"
        for name, targets in GRAPH.items()
        if _in("store", name)
        for target in targets
        if any(target == f"otel_cancel._core.{part}" for part in machinery)
    )
    assert crossing == []
