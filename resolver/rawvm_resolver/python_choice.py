"""Which Python a file input was made for, when it records none: a lock names wheels, a project a range.

A freeze or a lock locked for whatever Python runs rawvm may not install at all (a numpy 1.24 pin has no wheel
for 3.13). So the evidence the file carries decides, strongest first: wheel tags every locked package has a
wheel for (the newest such Python), then a requires-python range / poetry ``python`` constraint /
``python_version`` markers, which keep the running Python when they allow it and else take the nearest one.
Every choice comes with the words the report prints.
"""

from __future__ import annotations

import platform
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from packaging.markers import InvalidMarker, Marker, UndefinedComparison, UndefinedEnvironmentName
from packaging.specifiers import InvalidSpecifier, SpecifierSet
from packaging.utils import InvalidWheelFilename, parse_wheel_filename

# The CPython minors a lock can be for; the newest is the newest released.
KNOWN_PYTHONS = tuple(f"3.{minor}" for minor in range(8, 15))
NO_PYTHON_RECORDED = "the input records no Python: the running one"  # no evidence: python_from_index may ask
_MARKER_TOLERANCE = 0.1  # a python_version marker on a few lines (tomli < 3.11) only says where those install


@dataclass(frozen=True)
class PythonChoice:
    python: str  # X.Y
    reason: str  # e.g. "the newest Python every locked package has a wheel for (cp311 wheels)"


def running_python() -> str:
    return ".".join(platform.python_version().split(".")[:2])


def choose_python(
    *,
    wheel_names: Iterable[Sequence[str]] = (),
    ranges: Iterable[tuple[str, str]] = (),
    markers: Iterable[str] = (),
) -> PythonChoice:
    """The Python for a lock that records none.

    ``wheel_names``: per locked package, the wheel file names the lock lists for it. ``ranges``: (specifier,
    where it was read) pairs such as (">=3.10,<4", "poetry's python constraint"). ``markers``: the markers of the
    input's lines.
    """
    candidates = list(KNOWN_PYTHONS)
    said: list[str] = []
    for spec, where in ranges:
        allowed = _allowed_by(spec, candidates)
        if allowed:
            candidates = allowed
            said.append(f"{where} {spec}")
    by_markers = _allowed_by_markers(list(markers), candidates)
    if by_markers and by_markers != candidates:
        candidates = by_markers
        said.append("the python_version markers")
    by_wheels = _covered_by_wheels([list(names) for names in wheel_names], candidates)
    if by_wheels:
        newest = by_wheels[-1]
        tag = f"cp{newest.replace('.', '')}"
        return PythonChoice(newest, f"the newest Python every package with a listed wheel has one for ({tag} wheels)")
    running = running_python()
    if not said:
        return PythonChoice(running, NO_PYTHON_RECORDED)
    if running in candidates:
        return PythonChoice(running, f"the running Python, which {' and '.join(said)} allow")
    nearest = min(candidates, key=lambda version: abs(int(version.split(".")[1]) - int(running.split(".")[1])))
    return PythonChoice(nearest, f"the Python nearest the running one that {' and '.join(said)} allow")


def _allowed_by(spec: str, candidates: list[str]) -> list[str]:
    try:
        specifier = SpecifierSet(_poetry_to_pep440(spec))
    except InvalidSpecifier:
        return []
    # X.Y.99: ">=3.10.4" still allows 3.10, "<3.11" does not allow 3.11.
    return [version for version in candidates if specifier.contains(f"{version}.99") or specifier.contains(version)]


def _poetry_to_pep440(spec: str) -> str:
    """Poetry's ``^3.10`` / ``~3.10`` / ``3.10.*`` / ``>=3.9 || ^4`` as a PEP 440 set (the first alternative)."""
    from rawvm_resolver.lockfiles.poetry_ranges import poetry_constraint  # lazy: a cycle otherwise

    return poetry_constraint(spec.split("||")[0].strip())


def _allowed_by_markers(markers: list[str], candidates: list[str]) -> list[str]:
    parsed: list[Marker] = []
    for text in markers:
        if "python_version" not in text and "python_full_version" not in text:
            continue
        try:
            parsed.append(Marker(text))
        except InvalidMarker:
            continue
    if not parsed:
        return []
    allowed = []
    for version in candidates:
        environment = {"python_version": version, "python_full_version": f"{version}.0"}
        failing = sum(not _evaluates(marker, environment) for marker in parsed)
        if failing <= len(parsed) * _MARKER_TOLERANCE:
            allowed.append(version)
    return allowed


def _evaluates(marker: Marker, environment: dict[str, str]) -> bool:
    try:
        return marker.evaluate({"extra": "", **environment})
    except (UndefinedComparison, UndefinedEnvironmentName):
        return True


def _covered_by_wheels(packages: list[list[str]], candidates: list[str]) -> list[str]:
    """The candidates every package with a version-specific wheel has one for ([] when no package says)."""
    covered = set(candidates)
    said = False
    for names in packages:
        versions = wheel_pythons(names)
        if versions is None:
            continue  # pure wheels, an sdist only, or no file list: any Python
        said = True
        covered &= versions
    return [version for version in candidates if version in covered] if said else []


def wheel_pythons(names: list[str]) -> set[str] | None:
    """The Pythons a package's wheels install on; None when one of them is for any Python 3."""
    found: set[str] = set()
    for name in names:
        try:
            tags = parse_wheel_filename(name)[3]
        except InvalidWheelFilename:
            continue
        for tag in tags:
            if tag.interpreter.startswith("py3"):
                return None  # any Python 3 (py2.py3 wheels list py3 as one of their tags)
            if tag.interpreter.startswith("cp3") and tag.interpreter[3:].isdigit():
                minor = int(tag.interpreter[3:])
                if tag.abi in ("abi3", "none"):
                    found |= {version for version in KNOWN_PYTHONS if int(version.split(".")[1]) >= minor}
                else:
                    found.add(f"3.{minor}")
    return found or None
