"""The core's public surface (``worker.core.__all__``) and the packages' import rules.

As httpx does, the package's ``__all__`` is checked against what it really exports; and since the
surface is "what producers and the worker use", against what they import: a name imported from
the core that is not on it fails here, naming the file. The import rules (no package cycle):
``worker.core`` imports nothing of the project outside itself, ``producers`` imports only the
core, and the graph of packages has no cycle.
"""

from __future__ import annotations

import ast
import functools
import importlib
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

import producers
import worker.core

ROOT = Path(__file__).resolve().parent.parent
#: The project's packages, as the units of the import rules (``worker`` is the worker itself).
UNITS = ("worker.core", "worker.cli", "worker.console", "worker.devtools", "producers")


def source_files(*folders: str) -> Iterator[tuple[Path, str]]:
    """Each Python file below ``folders`` with its module name."""
    for folder in folders:
        for path in sorted((ROOT / folder).rglob("*.py")):
            module = ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
            yield path, module


@functools.cache
def imports(path: Path) -> tuple[tuple[str, tuple[str, ...]], ...]:
    """Every absolute import of a file, at any depth (lazy ones too): (module, names imported from it)."""
    found: list[tuple[str, tuple[str, ...]]] = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found += [(alias.name, ()) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append((node.module, tuple(alias.name for alias in node.names)))
    return tuple(found)


def unit(module: str) -> str | None:
    """The package of the project a module belongs to; None for anything else (the standard library, ...)."""
    for name in UNITS:
        if module == name or module.startswith(name + "."):
            return name
    return "worker" if module == "worker" or module.startswith("worker.") else None


def test_the_surface_is_exactly_what_the_package_exports() -> None:
    assert worker.core.__all__ == sorted(set(worker.core.__all__)), "__all__ is sorted, each name once"
    assert dir(worker.core) == worker.core.__all__
    modules = [module for module, names in worker.core.SURFACE.items() if not names]
    named = [name for names in worker.core.SURFACE.values() for name in names.split()]
    assert len(named) == len(set(named)), "a name stands under one module only"
    assert sorted([*modules, *named]) == worker.core.__all__
    for module, names in worker.core.SURFACE.items():
        source = importlib.import_module(f"worker.core.{module}")
        if not names:
            assert getattr(worker.core, module) is source
        for name in names.split():
            assert getattr(worker.core, name) is getattr(source, name), f"worker.core.{name}"
    with pytest.raises(AttributeError, match="its surface is __all__"):
        _ = worker.core.Lua  # not on the surface: the point of the test


def test_importing_the_core_imports_nothing_by_itself() -> None:
    """``leadstage --help`` must not load redis-py or structlog: the package's own imports
    are the standard library's only (its names load on first use)."""
    tree = ast.parse((ROOT / "worker" / "core" / "__init__.py").read_text(encoding="utf-8"))
    runtime = [node for node in tree.body if isinstance(node, ast.Import | ast.ImportFrom)]
    assert {ast.unparse(node) for node in runtime} == {
        "from __future__ import annotations",
        "import importlib",
        "from typing import Any, Final",
    }


def test_nothing_outside_the_core_reaches_past_its_surface() -> None:
    surface = {module: set(names.split()) for module, names in worker.core.SURFACE.items()}
    beyond = []
    for path, module in source_files("worker", "producers"):
        if unit(module) == "worker.core":
            continue
        where = path.relative_to(ROOT)
        for imported, names in imports(path):
            if imported == "worker.core":  # from worker.core import keys
                beyond += [f"{where}: {name}" for name in names if name not in worker.core.__all__]
            elif imported.startswith("worker.core."):
                inner = imported.removeprefix("worker.core.")
                if inner not in surface:  # a module that is not on the surface (errors.base, say)
                    beyond.append(f"{where}: {imported}")
                elif names and surface[inner]:  # from worker.core.settings import Settings
                    beyond += [f"{where}: {imported}.{name}" for name in names if name not in surface[inner]]
                elif names:  # a module used whole: its own __all__ is its surface
                    exported = getattr(importlib.import_module(imported), "__all__", ())
                    beyond += [f"{where}: {imported}.{name}" for name in names if name not in exported]
    assert not beyond, "not on worker/core/__init__.py's surface (add them to its SURFACE): " + "; ".join(beyond)


@functools.cache
def package_graph() -> dict[str, frozenset[str]]:
    graph: dict[str, set[str]] = {name: set() for name in (*UNITS, "worker")}
    for path, module in source_files("worker", "producers"):
        here = unit(module)
        assert here is not None
        for imported, _ in imports(path):
            there = unit(imported)
            if there is not None and there != here:
                graph[here].add(there)
    return {name: frozenset(imported) for name, imported in graph.items()}


def test_the_packages_keep_their_import_rules() -> None:
    graph = package_graph()
    assert graph["worker.core"] == set(), "worker.core imports nothing of the project outside itself"
    assert graph["producers"] <= {"worker.core"}, "producers import only the core"
    for name in graph.keys() - {"worker.cli"}:
        assert not graph[name] & {"worker.cli", "worker.devtools"}, f"{name} imports the CLI or the devtools"


def test_the_packages_import_without_a_cycle() -> None:
    graph = package_graph()
    done: set[str] = set()

    def visit(name: str, path: tuple[str, ...]) -> None:
        assert name not in path, "import cycle: " + " -> ".join((*path, name))
        if name not in done:
            for there in sorted(graph[name]):
                visit(there, (*path, name))
            done.add(name)

    for name in sorted(graph):
        visit(name, ())


@pytest.mark.system  # starts an interpreter of its own
def test_the_producers_package_exports_its_all_and_loads_each_name_on_first_use() -> None:
    assert producers.__all__ == sorted(producers.__all__)
    assert set(producers.__all__) <= set(dir(producers))
    for name in producers.__all__:
        assert getattr(producers, name).__name__ == name
    with pytest.raises(AttributeError, match="no attribute 'Nope'"):
        producers.Nope  # noqa: B018 - the attribute access is what is tested
    # In a fresh interpreter: importing the package loads none of its modules by itself.
    probe = "import sys, producers; print(sorted(m for m in sys.modules if m.startswith('producers.')))"
    loaded = subprocess.run(  # noqa: S603 - our own interpreter running a constant probe
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True, cwd=ROOT
    )
    assert loaded.stdout.strip() == "[]"
