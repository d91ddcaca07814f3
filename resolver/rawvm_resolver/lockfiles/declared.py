"""A pyproject.toml's declared dependencies (PEP 621, PEP 735 groups, PDM and Poetry tables) and Python range.

A project given without a lock locks from these ranges; a lock given with its project uses them to tell which
of the locked packages the project asks for (the rest are pins of their dependencies).
"""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rawvm_resolver.environment import Distribution, Environment, Source, SourcePlatform, canonical, parse_requirement
from rawvm_resolver.lockfiles.poetry_ranges import poetry_dependencies
from rawvm_resolver.python_choice import choose_python
from rawvm_resolver.sources import load_toml, parse_requirement_lines


@dataclass(frozen=True)
class Declared:
    """What a pyproject.toml asks for."""

    path: Path
    lines: tuple[str, ...]  # requirement lines (pip syntax; ``-e PATH`` for a develop path dependency)
    project: Distribution | None  # the project itself when it is a package (built into wheels/)
    ranges: tuple[tuple[str, str], ...]  # (requires-python or poetry python constraint, where it was read)
    python: str  # the X.Y a .python-version file pins, else ""
    warnings: tuple[str, ...] = ()  # what was left out (the project itself when its code is not here)
    name: str = ""  # the project's canonical name, "" when it declares none

    def names(self) -> frozenset[str]:
        names = set()
        for line in self.lines:
            requirement = parse_requirement(line)
            if requirement is not None:
                names.add(canonical(requirement.name))
            elif line.startswith("-e "):
                names.add(canonical(Path(shlex.split(line)[1]).name))
        return frozenset(names)

    def extras(self) -> dict[str, tuple[str, ...]]:
        found: dict[str, tuple[str, ...]] = {}
        for line in self.lines:
            requirement = parse_requirement(line)
            if requirement is not None and requirement.extras:
                found[canonical(requirement.name)] = tuple(sorted(requirement.extras))
        return found

    def markers(self) -> tuple[str, ...]:
        requirements = (parse_requirement(line) for line in self.lines)
        return tuple(str(req.marker) for req in requirements if req is not None and req.marker is not None)


def read_declared(path: Path) -> Declared:
    data = load_toml(path)
    project: dict[str, Any] = data.get("project", {})
    lines = [str(line) for line in project.get("dependencies", []) if isinstance(line, str)]
    for group in data.get("dependency-groups", {}).values():  # PEP 735: `uv sync` installs `dev` by default
        lines += [line for line in group if isinstance(line, str)]
    for group in data.get("tool", {}).get("pdm", {}).get("dev-dependencies", {}).values():
        lines += [line for line in group if isinstance(line, str)]
    lines += poetry_dependencies(data, path.parent)
    poetry = data.get("tool", {}).get("poetry", {})
    ranges: list[tuple[str, str]] = []
    if project.get("requires-python"):
        ranges.append((str(project["requires-python"]), "requires-python"))
    if isinstance(poetry.get("dependencies", {}).get("python"), str):
        ranges.append((str(poetry["dependencies"]["python"]), "poetry's python constraint"))
    name = project.get("name") or poetry.get("name")
    local = None
    warnings: list[str] = []
    if name and _is_package(data):
        if _sources_present(path.parent, str(name), poetry):
            url = path.parent.resolve().as_uri()
            local = Distribution(name=canonical(str(name)), version="", requested=True, source=Source("editable", url))
        else:
            warnings.append(f"the project {name} itself is not in {path.parent} (no package sources): left out")
    return Declared(
        path,
        tuple(_unique(lines)),
        local,
        tuple(ranges),
        _python_version_file(path.parent),
        tuple(warnings),
        canonical(str(name)) if name else "",
    )


def _sources_present(directory: Path, name: str, poetry: dict[str, Any]) -> bool:
    """Whether the project's own code is beside its pyproject.toml (a lone copied pyproject.toml has none)."""
    module = re.sub(r"[-.]+", "_", name).lower()
    candidates = [directory / "src", directory / module, directory / f"{module}.py", directory / "setup.py"]
    for package in poetry.get("packages", []):
        if isinstance(package, dict) and package.get("include"):
            candidates.append(directory / str(package.get("from", ".")) / str(package["include"]))
    return any(candidate.exists() for candidate in candidates)


def read_project(path: Path) -> Environment:
    """A pyproject.toml without a lock: its declared ranges, and the project itself when it is a package."""
    declared = read_declared(path)
    dists, requirements = parse_requirement_lines(list(declared.lines), path.parent)
    if declared.project is not None:
        dists[declared.project.name] = declared.project
    if declared.python:
        python, reason = declared.python, f"{path.parent / '.python-version'} pins Python {declared.python}"
    else:
        choice = choose_python(ranges=declared.ranges, markers=declared.markers())
        python, reason = choice.python, choice.reason
    return Environment(
        origin=str(path),
        kind="project",
        platform=SourcePlatform(python=python, platform="", python_from=reason),
        distributions=tuple(sorted(dists.values(), key=lambda d: d.name)),
        requirements=tuple(requirements),
        warnings=declared.warnings,
    )


def _is_package(data: dict[str, Any]) -> bool:
    package = data.get("tool", {}).get("uv", {}).get("package")
    if package is not None:
        return bool(package)
    if data.get("tool", {}).get("poetry", {}).get("package-mode") is False:
        return False
    return "build-system" in data


def _python_version_file(directory: Path) -> str:
    pinned = directory / ".python-version"
    if not pinned.is_file():
        return ""
    text = pinned.read_text().strip().splitlines()[0] if pinned.read_text().strip() else ""
    return text if re.fullmatch(r"3\.\d+(\.\d+)?", text) else ""


def _unique(lines: list[str]) -> list[str]:
    return list(dict.fromkeys(lines))
