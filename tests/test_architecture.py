"""The shape of the code, checked: the front door's names and signatures, no reaching into another module's
private names, no import cycles, no oversized modules (docs/architecture.md, "Where things are")."""

from __future__ import annotations

import ast
import inspect
from collections.abc import Iterator
from pathlib import Path

import grimp
import pytest
import rawvm

REPO = Path(__file__).resolve().parent.parent
PACKAGES = {"rawvm": "bootstrap", "rawvm_agent": "agent", "rawvm_resolver": "resolver", "rawvm_images": "images"}
PROJECT_ROOTS = (*PACKAGES, "tests", "bench")
MAX_LINES = 500
FRONT_DOOR = ("run", "up", "batch", "dask_cluster", "function")


def python_files(*folders: str) -> Iterator[Path]:
    for folder in folders:
        yield from sorted((REPO / folder).rglob("*.py"))


def module_name(path: Path) -> str:
    """``bootstrap/rawvm/cli/run.py`` -> ``rawvm.cli.run``; ``tests/x.py`` -> ``tests.x``."""
    parts = path.relative_to(REPO).with_suffix("").parts
    if parts[0] in PACKAGES.values():
        parts = parts[1:]
    return ".".join(p for p in parts if p != "__init__")


def is_project(module: str) -> bool:
    return module.split(".")[0] in PROJECT_ROOTS


def is_private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def absolute(module: str | None, level: int, here: str, is_package: bool) -> str:
    """The absolute module of a ``from`` import, relative ones resolved against ``here``."""
    if level == 0:
        return module or ""
    base = here.split(".") if is_package else here.split(".")[:-1]
    base = base[: len(base) - (level - 1)]
    return ".".join([*base, module] if module else base)


def is_module(dotted: str) -> bool:
    """Whether ``dotted`` names a module or package of this repository (not a function or class in one)."""
    parts = dotted.split(".")
    folder = REPO / PACKAGES.get(parts[0], "") / Path(*parts)
    return folder.with_suffix(".py").is_file() or (folder / "__init__.py").is_file()


def private_uses(path: Path) -> Iterator[str]:
    """``file:line name`` for each private name this file takes from another project module: ``from m import _x``,
    and ``m._x`` where ``m`` was imported here as a project module."""
    here = module_name(path)
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    modules: set[str] = set()  # local names bound to project modules
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            source = absolute(node.module, node.level, here, path.name == "__init__.py")
            if not is_project(source) or source == here:
                continue
            for alias in node.names:
                if is_private(alias.name):
                    yield f"{path.relative_to(REPO)}:{node.lineno} from {source} import {alias.name}"
                elif is_module(f"{source}.{alias.name}"):
                    modules.add(alias.asname or alias.name)
        elif isinstance(node, ast.Import):
            modules.update(alias.asname or alias.name for alias in node.names if is_project(alias.name))
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and is_private(node.attr):
            owner = ast.unparse(node.value)
            if owner in modules or (is_project(owner) and is_module(owner)):
                yield f"{path.relative_to(REPO)}:{node.lineno} {owner}.{node.attr}"


def test_the_front_door_exports_what_it_lists() -> None:
    for name in rawvm.__all__:
        assert getattr(rawvm, name) is not None, name
    assert set(FRONT_DOOR) <= set(rawvm.__all__)
    assert sorted(rawvm.__all__) == rawvm.__all__


@pytest.mark.parametrize("name", FRONT_DOOR)
def test_front_door_functions_show_their_real_parameters(name: str) -> None:
    signature = inspect.signature(getattr(rawvm, name))
    kinds = {p.kind for p in signature.parameters.values()}
    assert inspect.Parameter.VAR_POSITIONAL not in kinds and inspect.Parameter.VAR_KEYWORD not in kinds
    for parameter in ("provider", "n", "keepalive", "source"):
        assert parameter in signature.parameters, f"rawvm.{name} lacks {parameter}"
    assert all(p.annotation is not inspect.Parameter.empty for p in signature.parameters.values())


def test_no_module_takes_another_modules_private_names() -> None:
    found = [use for path in python_files(*PACKAGES.values(), "tests", "bench") for use in private_uses(path)]
    assert found == []


@pytest.mark.parametrize("package", sorted(PACKAGES))
def test_no_import_cycles_counting_imports_inside_functions(package: str) -> None:
    graph = grimp.build_graph(package, exclude_type_checking_imports=True)
    modules = sorted(graph.modules)
    # Tarjan's strongly connected components over the module graph
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []

    def visit(module: str) -> None:
        index[module] = low[module] = len(index)
        stack.append(module)
        on_stack.add(module)
        for imported in sorted(graph.find_modules_directly_imported_by(module)):
            if imported not in index:
                visit(imported)
                low[module] = min(low[module], low[imported])
            elif imported in on_stack:
                low[module] = min(low[module], index[imported])
        if low[module] == index[module]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == module:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for module in modules:
        if module not in index:
            visit(module)
    assert cycles == []


def test_no_source_file_is_over_500_lines() -> None:
    long = {
        str(path.relative_to(REPO)): n
        for path in python_files(*PACKAGES.values())
        if (n := len(path.read_text(encoding="utf-8").splitlines())) > MAX_LINES
    }
    assert long == {}


def test_importing_rawvm_stays_cheap() -> None:
    """The CLI and ``import rawvm`` pay for aiohttp, boto3 or the resolver only when a command needs them."""
    import subprocess
    import sys

    heavy = ("aiohttp", "boto3", "rawvm_resolver", "rawvm.api", "cryptography")
    probe = f"import sys, rawvm; print([m for m in {heavy!r} if m in sys.modules])"
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"
    assert callable(rawvm.run)  # and the names still resolve on first use
