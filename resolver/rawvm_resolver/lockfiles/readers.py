"""The TOML and JSON lock formats read into LockInput: poetry.lock, pdm.lock, uv.lock, Pipfile.lock, pylock.toml.

Each reader keeps what the lock records: every package's version, the marker under which it installs, the
dependency edges (for which packages are roots), the wheel file names (for the Python), and a VCS / local
source where the lock has one. The project beside the lock (pyproject.toml, Pipfile) says which are requested.
"""

from __future__ import annotations

import json
import re
import tomllib
from pathlib import Path
from typing import Any

from rawvm_resolver.environment import Distribution, Source, canonical, parse_requirement
from rawvm_resolver.errors import InputError
from rawvm_resolver.lockfiles.common import LockedPackage, LockInput, wheel_file_names
from rawvm_resolver.lockfiles.declared import Declared, read_declared
from rawvm_resolver.sources import load_toml


def read_poetry_lock(path: Path) -> LockInput:
    data = load_toml(path)
    metadata = data.get("metadata", {})
    old_files: dict[str, Any] = metadata.get("files", {})  # lock-version 1.x lists files here
    packages = []
    for entry in data.get("package", []):
        files = entry.get("files") or old_files.get(entry["name"], [])
        dependencies = tuple(canonical(name) for name in entry.get("dependencies", {}))
        packages.append(
            LockedPackage(
                name=entry["name"],
                version=str(entry["version"]),
                marker=_poetry_marker(entry.get("markers")),
                dependencies=dependencies,
                wheels=wheel_file_names(str(item.get("file", "")) for item in files),
                source=_poetry_source(entry.get("source"), path.parent),
            )
        )
    ranges = [(str(metadata["python-versions"]), "the lock's python-versions")] if "python-versions" in metadata else []
    return _with_project(path, packages, ranges)


def _poetry_marker(markers: Any) -> str:
    """``markers`` is a string, or (Poetry 1.5+) a table by group: the main group's, else any group's."""
    if isinstance(markers, dict):
        texts = [str(text) for text in markers.values()]
        main = markers.get("main")
        return str(main) if main is not None else (f"({') or ('.join(texts)})" if texts else "")
    return str(markers or "")


def _poetry_source(source: Any, base_dir: Path) -> Source:
    if not isinstance(source, dict):
        return Source()
    kind, url = source.get("type", ""), str(source.get("url", ""))
    if kind == "git":
        return Source(kind="vcs", url=f"git+{url}", commit=str(source.get("resolved_reference") or ""))
    if kind in ("directory", "file"):
        local = (base_dir / url).resolve()
        return Source(kind="directory" if kind == "directory" else "archive", url=local.as_uri())
    if kind == "url":
        return Source(kind="archive", url=url)
    return Source()  # legacy / pypi: an index


def read_pdm_lock(path: Path) -> LockInput:
    data = load_toml(path)
    packages = []
    for entry in data.get("package", []):
        requirements = [parse_requirement(line) for line in entry.get("dependencies", [])]
        packages.append(
            LockedPackage(
                name=entry["name"],
                version=str(entry.get("version", "")),
                marker=str(entry.get("marker", "")),
                dependencies=tuple(canonical(req.name) for req in requirements if req is not None),
                wheels=wheel_file_names(
                    str(item.get("file") or item.get("url", "")) for item in entry.get("files", [])
                ),
                source=_pdm_source(entry, path.parent),
            )
        )
    metadata = data.get("metadata", {})
    ranges = [(str(metadata["requires_python"]), "the lock's requires_python")] if "requires_python" in metadata else []
    return _with_project(path, packages, ranges)


def _pdm_source(entry: dict[str, Any], base_dir: Path) -> Source:
    if "git" in entry:
        return Source(
            kind="vcs", url=f"git+{entry['git']}", commit=str(entry.get("revision") or entry.get("ref") or "")
        )
    if "path" in entry:
        local = (base_dir / str(entry["path"])).resolve()
        return Source(kind="editable" if entry.get("editable") else "directory", url=local.as_uri())
    if "url" in entry:
        return Source(kind="archive", url=str(entry["url"]))
    return Source()


def read_uv_lock(path: Path) -> LockInput:
    """A uv.lock: a package with several versions (a universal lock, by platform) keeps each behind its markers."""
    data = load_toml(path)
    packages = []
    asked: dict[str, tuple[str, ...]] = {}  # what the project (and workspace members) depend on, with extras
    for entry in data.get("package", []):
        source = entry.get("source", {})
        local = source.get("editable") or source.get("directory")
        if "virtual" in source or "editable" in source:
            # `uv sync` installs the dev group by default, so the environment the user runs has it too.
            for dep in [*entry.get("dependencies", []), *entry.get("dev-dependencies", {}).get("dev", [])]:
                asked[canonical(dep["name"])] = tuple(
                    sorted({*asked.get(canonical(dep["name"]), ()), *dep.get("extra", [])})
                )
        if "virtual" in source:
            continue  # a workspace root that is no package: its dependencies come from the project
        if local is not None:
            kind = "editable" if "editable" in source else "directory"
            found = Source(kind=kind, url=(path.parent / str(local)).resolve().as_uri())
        elif "git" in source:
            url, _, commit = str(source["git"]).partition("#")
            found = Source(kind="vcs", url=f"git+{url.split('?')[0]}", commit=commit)
        elif "url" in source:
            found = Source(kind="archive", url=str(source["url"]))
        else:
            found = Source()
        markers = [str(marker) for marker in entry.get("resolution-markers", [])]
        packages.append(
            LockedPackage(
                name=entry["name"],
                version=str(entry.get("version", "")),
                marker=" or ".join(f"({marker})" for marker in markers) if markers else "",
                dependencies=tuple(canonical(dep["name"]) for dep in entry.get("dependencies", [])),
                wheels=wheel_file_names(
                    str(wheel.get("url") or wheel.get("path", "")) for wheel in entry.get("wheels", [])
                ),
                source=found,
            )
        )
    ranges = [(str(data["requires-python"]), "the lock's requires-python")] if "requires-python" in data else []
    return _with_project(path, packages, ranges, asked)


def read_pylock(path: Path) -> LockInput:
    """PEP 751: ``[[packages]]`` with name, version, marker, wheels, sdist, vcs, directory, dependencies."""
    data = load_toml(path)
    packages = []
    for entry in data.get("packages", []):
        if "vcs" in entry:
            vcs = entry["vcs"]
            source = Source(
                kind="vcs", url=f"{vcs.get('type', 'git')}+{vcs.get('url', '')}", commit=vcs.get("commit-id", "")
            )
        elif "directory" in entry:
            local = (path.parent / str(entry["directory"].get("path", "."))).resolve()
            source = Source(kind="editable" if entry["directory"].get("editable") else "directory", url=local.as_uri())
        else:
            source = Source()
        dependencies = entry.get("dependencies")
        packages.append(
            LockedPackage(
                name=entry["name"],
                version=str(entry.get("version", "")),
                marker=_every_group(str(entry.get("marker", ""))),
                dependencies=None if dependencies is None else tuple(canonical(dep["name"]) for dep in dependencies),
                wheels=wheel_file_names(
                    str(wheel.get("name") or wheel.get("url", "")) for wheel in entry.get("wheels", [])
                ),
                source=source,
            )
        )
    ranges = [(str(data["requires-python"]), "the lock's requires-python")] if "requires-python" in data else []
    return _with_project(path, packages, ranges)


_GROUP_TEST = re.compile(r"""(["'])[^"']*\1\s+in\s+dependency_groups""")


def _every_group(marker: str) -> str:
    """A pylock marker with ``"test" in dependency_groups`` true for every group (the environment the project
    runs in has its groups, as ``uv sync`` installs the dev group); the rest of the marker still decides."""
    return _GROUP_TEST.sub("'a' in 'a'", marker)


def read_pipfile_lock(path: Path) -> LockInput:
    """Pipfile.lock (JSON): ``default`` and ``develop`` sections of ``==version`` pins with markers; no graph."""
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InputError(f"{path}: cannot read it as JSON ({exc})") from None
    packages = []
    for section in ("default", "develop"):
        for name, entry in (data.get(section) or {}).items():
            source = Source()
            if "git" in entry:
                source = Source(kind="vcs", url=f"git+{entry['git']}", commit=str(entry.get("ref", "")))
            elif "path" in entry:
                local = (path.parent / str(entry["path"])).resolve()
                source = Source(kind="editable" if entry.get("editable") else "directory", url=local.as_uri())
            version = str(entry.get("version", "")).removeprefix("==")
            packages.append(
                LockedPackage(name=name, version=version, marker=str(entry.get("markers", "")), source=source)
            )
    requires = data.get("_meta", {}).get("requires", {})
    python = str(requires.get("python_full_version") or requires.get("python_version") or "")
    pipfile = path.with_name("Pipfile")
    requested = _pipfile_names(pipfile) if pipfile.is_file() else None
    return LockInput(
        origin=str(path),
        packages=tuple(packages),
        requested=requested,
        python=".".join(python.split(".")[:2]),
        python_from="the lock's _meta.requires" if python else "",
    )


def _pipfile_names(pipfile: Path) -> frozenset[str] | None:
    try:
        data = tomllib.loads(pipfile.read_text())
    except (OSError, tomllib.TOMLDecodeError):
        return None
    return frozenset(canonical(name) for section in ("packages", "dev-packages") for name in data.get(section, {}))


def _with_project(
    path: Path,
    packages: list[LockedPackage],
    ranges: list[tuple[str, str]],
    asked: dict[str, tuple[str, ...]] | None = None,
) -> LockInput:
    """The lock plus what its pyproject.toml declares (which packages are asked for, the project itself).

    ``asked``: the names (and extras) the lock itself records as the project's dependencies, where it does.
    """
    pyproject = path.with_name("pyproject.toml")
    declared: Declared | None = read_declared(pyproject) if pyproject.is_file() else None
    if declared is None:
        requested = None if not asked else frozenset(asked)
        return LockInput(
            origin=str(path), packages=tuple(packages), ranges=tuple(ranges), requested=requested, extras=asked or {}
        )
    project_name = declared.name  # the project is built from its directory (when there), never pinned
    # A local package the lock lists (the project, a path dependency) is built from its directory, not pinned.
    locals_ = [package for package in packages if package.source.kind in ("editable", "directory")]
    kept = [package for package in packages if package not in locals_ and canonical(package.name) != project_name]
    local = [declared.project] if declared.project is not None else []
    for package in locals_:
        if canonical(package.name) != project_name:
            local.append(Distribution(name=canonical(package.name), version="", requested=True, source=package.source))
    python_file = path.parent / ".python-version"
    return LockInput(
        origin=str(path),
        packages=tuple(kept),
        requested=(declared.names() | set(asked or {})) - {project_name},
        extras={**(asked or {}), **declared.extras()},
        local=tuple(local),
        python=declared.python,
        python_from=str(python_file) if declared.python else "",
        ranges=(*declared.ranges, *ranges),
        markers=declared.markers(),
        warnings=declared.warnings,
    )
