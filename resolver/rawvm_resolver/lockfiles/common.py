"""What every lock format becomes: locked packages (pins with markers) → the typed Environment a freeze gives.

A lock pins every package for every platform it was made for (a lock made on macOS carries Linux entries, behind
markers), so the pins keep their markers here and ``select_for_target`` keeps those true on the target once its
Python is known. Which pins are *requested* decides what uv is asked for: the project's declared dependencies
when the project file is there, else the roots of the lock's dependency graph, else (a lock with no graph) all.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from packaging.markers import InvalidMarker, Marker, UndefinedComparison, UndefinedEnvironmentName

from rawvm_resolver.environment import Distribution, Environment, Source, SourcePlatform, canonical, parse_requirement
from rawvm_resolver.errors import InputError
from rawvm_resolver.python_choice import PythonChoice, choose_python
from rawvm_resolver.report import ReportRow


@dataclass(frozen=True)
class LockedPackage:
    name: str  # as the lock spells it
    version: str
    marker: str = ""  # where the lock installs it ("" everywhere)
    dependencies: tuple[str, ...] | None = None  # canonical names it needs; None when the lock does not say
    wheels: tuple[str, ...] = ()  # wheel file names the lock lists (they tell the Python it was made for)
    source: Source = field(default_factory=Source)


@dataclass(frozen=True)
class LockInput:
    """One lock file read, before it becomes an Environment."""

    origin: str
    packages: tuple[LockedPackage, ...]
    requested: frozenset[str] | None = None  # canonical names the project asks for; None: unknown
    extras: dict[str, tuple[str, ...]] = field(default_factory=dict)  # extras the project asks for, by name
    requirements: tuple[str, ...] = ()  # declared requirements the lock does not pin (local paths, URLs)
    local: tuple[Distribution, ...] = ()  # the project itself and path dependencies, built into wheels/
    python: str = ""  # the Python the lock records, "" when none
    python_from: str = ""  # where that was read
    ranges: tuple[tuple[str, str], ...] = ()  # (requires-python spec, where) when no Python is recorded
    markers: tuple[str, ...] = ()  # the declared requirements' markers (python_version ones tell a range)
    warnings: tuple[str, ...] = ()


def lock_environment(lock: LockInput) -> Environment:
    """The lock as an Environment: pins (markers kept) and which of them the project requests."""
    requested = lock.requested if lock.requested is not None else _roots(lock.packages)
    local_names = {dist.name for dist in lock.local}
    dists: list[Distribution] = list(lock.local)
    for package in lock.packages:
        name = canonical(package.name)
        if name in local_names:
            continue
        dists.append(
            Distribution(
                name=name,
                display_name=package.name,
                version=package.version,
                requested=name in requested,
                source=package.source,
                extras=lock.extras.get(name, ()) if name in requested else (),
                marker=package.marker,
            )
        )
    choice = _python(lock)
    return Environment(
        origin=lock.origin,
        kind="lock",
        platform=SourcePlatform(python=choice.python, platform="", python_from=choice.reason),
        distributions=tuple(sorted(dists, key=lambda dist: (dist.name, dist.marker))),
        requirements=lock.requirements,
        warnings=lock.warnings,
    )


def _roots(packages: Sequence[LockedPackage]) -> frozenset[str]:
    """Packages nothing else in the lock needs; every package when the lock records no dependencies."""
    if not packages or any(package.dependencies is None for package in packages):
        return frozenset(canonical(package.name) for package in packages)
    needed = {dependency for package in packages for dependency in package.dependencies or ()}
    roots = frozenset(canonical(package.name) for package in packages) - needed
    # A cycle of roots (a <-> b and nothing else) would leave none: then everything is requested.
    return roots or frozenset(canonical(package.name) for package in packages)


def _python(lock: LockInput) -> PythonChoice:
    if lock.python:
        return PythonChoice(lock.python, f"{lock.python_from} records Python {lock.python}")
    return choose_python(
        wheel_names=[package.wheels for package in lock.packages if package.wheels],
        ranges=lock.ranges,
        markers=[*lock.markers, *(package.marker for package in lock.packages if package.marker)],
    )


def marker_holds(marker: str, environment: dict[str, str]) -> bool:
    """Whether a lock's marker is true for the target; an unreadable marker holds (uv decides then)."""
    if not marker:
        return True
    try:
        return Marker(marker).evaluate(environment)
    except (InvalidMarker, UndefinedComparison, UndefinedEnvironmentName):
        return True


def select_for_target(env: Environment, environment: dict[str, str]) -> tuple[Environment, list[ReportRow]]:
    """Keep, per name, the first pin whose marker holds on the target; the others become ``dropped`` rows.

    Only lock inputs carry markers on pins; any other Environment comes back unchanged.
    """
    if not any(dist.marker for dist in env.distributions):
        return env, []
    kept: dict[str, Distribution] = {}
    skipped: dict[str, Distribution] = {}
    for dist in env.distributions:
        if dist.name in kept:
            continue
        if marker_holds(dist.marker, environment):
            kept[dist.name] = dataclasses.replace(dist, marker="")
        else:
            skipped.setdefault(dist.name, dist)
    rows = [
        ReportRow(name, "dropped", dist.version, "", f"the lock installs it only where {dist.marker}")
        for name, dist in sorted(skipped.items())
        if name not in kept
    ]
    return dataclasses.replace(env, distributions=tuple(sorted(kept.values(), key=lambda d: d.name))), rows


def wheel_file_names(urls_or_names: Iterable[str]) -> tuple[str, ...]:
    """The ``*.whl`` file names among file names or URLs, as a lock lists its files."""
    names = (text.rsplit("/", 1)[-1].split("#", 1)[0] for text in urls_or_names)
    return tuple(name for name in names if name.endswith(".whl"))


def check_not_empty(env: Environment, pylock: dict[str, object], rows: Sequence[ReportRow], has_conda: bool) -> None:
    """A lock with no package from an input that names some is a failure to say, never a quiet success."""
    packages = pylock.get("packages")
    if packages or has_conda:
        return
    named = sorted({dist.name for dist in env.distributions} | {_name(line) for line in env.requirements} - {""})
    if not named:
        return
    dropped = [row for row in rows if row.action == "dropped"]
    why = f"all {len(dropped)} were dropped for the target (see --explain)" if dropped else "uv resolved none of them"
    shown = ", ".join(named[:5]) + (", …" if len(named) > 5 else "")
    raise InputError(
        f"{env.origin}: the lock came out with no packages though the input names {len(named)} ({shown}): {why}"
    )


def _name(line: str) -> str:
    requirement = parse_requirement(line)
    return canonical(requirement.name) if requirement is not None else ""
