"""``conda list --export`` and ``conda list --explicit`` files (conda's "text spec files"), told by content.

``--export`` writes ``name=version=build`` lines under a ``# platform: osx-arm64`` header; packages pip installed
carry the build ``pypi_0`` and go to the PyPI side as pins. ``--explicit`` writes ``@EXPLICIT`` and then one package
URL a line (``…/conda-forge/osx-arm64/numpy-1.26.4-py311h….conda#md5``). Hand-written spec files (MatchSpec
lines, ``name==version``) read the same as ``--export``.
"""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path
from urllib.parse import urlsplit

from rawvm_resolver.conda.inputs import CondaInput
from rawvm_resolver.conda.specs import carry_over, macos_only_reason, normalize_channel, spec_name
from rawvm_resolver.errors import InputError

EXPLICIT = "explicit"
EXPORT = "export"

_SNIFF_BYTES = 256 * 1024
_PLATFORM = re.compile(r"#\s*platform:\s*(?P<subdir>[\w-]+)\s*$")
_EXPORT_LINE = re.compile(r"[A-Za-z0-9_.\-]+=[^=\s]+=[^=\s]+")
# pip-installed (pypi_0) and `pip install -e` / `conda develop` (dev_0) packages in `conda list --export`.
_PIP_BUILD = re.compile(r"(pypi|dev)_\d+")
_ARCHIVE = re.compile(r"(?P<name>.+)-(?P<version>[^-]+)-(?P<build>[^-]+)\.(tar\.bz2|conda)")


def conda_list_kind(path: Path) -> str | None:
    """EXPLICIT, EXPORT or None: what the file's content says it is (its name is not asked)."""
    try:
        with path.open("rb") as handle:
            text = handle.read(_SNIFF_BYTES).decode("utf-8", errors="replace")
    except OSError:
        return None
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if "@EXPLICIT" in lines:
        return EXPLICIT
    if any(_PLATFORM.fullmatch(line) for line in lines):
        return EXPORT
    packages = [line for line in lines if not line.startswith("#")]
    if packages and all(_EXPORT_LINE.fullmatch(line) for line in packages):
        return EXPORT  # the header was cut off, but every line is name=version=build
    return None


def read_conda_list(path: Path) -> CondaInput:
    """A ``conda list --export`` / ``--explicit`` file as the conda part of an environment."""
    try:
        text = path.read_text(errors="replace")
    except OSError as exc:
        raise InputError(f"{path}: cannot read ({exc.strerror})") from None
    lines = [line.strip() for line in text.splitlines()]
    subdir = next((match["subdir"] for line in lines if (match := _PLATFORM.fullmatch(line))), "")
    if "@EXPLICIT" in lines:
        return _read_explicit(path, lines, subdir)
    return _read_export(path, lines, subdir)


def _read_export(path: Path, lines: list[str], subdir: str) -> CondaInput:
    specs: list[str] = []
    pip: list[str] = []
    dropped: list[tuple[str, str, str]] = []
    for number, line in enumerate(lines, start=1):
        if not line or line.startswith("#"):
            continue
        parts = line.split("=")
        if len(parts) == 3 and _PIP_BUILD.fullmatch(parts[2]):
            pip.append(f"{parts[0]}=={parts[1]}")
            continue
        _carry(path, number, line, specs, dropped)
    return CondaInput(
        channels=(), specs=tuple(specs), pip_requirements=tuple(pip), subdir=subdir, dropped=tuple(dropped)
    )


def _read_explicit(path: Path, lines: list[str], subdir: str) -> CondaInput:
    specs: list[str] = []
    dropped: list[tuple[str, str, str]] = []
    channels: Counter[str] = Counter()
    for number, line in enumerate(lines, start=1):
        if not line or line.startswith("#") or line == "@EXPLICIT":
            continue
        url = urlsplit(line)
        segments = url.path.rstrip("/").split("/")
        match = _ARCHIVE.fullmatch(segments[-1]) if url.scheme else None
        if match is None or len(segments) < 3:
            raise InputError(
                f"{path}:{number}: {line!r} is no conda package URL; an @EXPLICIT file lists one package URL a line"
            )
        subdir = subdir or ("" if segments[-2] == "noarch" else segments[-2])
        channels[normalize_channel(f"{url.scheme}://{url.netloc}{'/'.join(segments[:-1])}")] += 1
        _carry(path, number, f"{match['name']}={match['version']}={match['build']}", specs, dropped)
    # The channel most packages came from first, as conda's strict priority would look them up.
    ordered = tuple(name for name, _ in sorted(channels.items(), key=lambda item: (-item[1], item[0])))
    return CondaInput(channels=ordered, specs=tuple(specs), pip_requirements=(), subdir=subdir, dropped=tuple(dropped))


def _carry(path: Path, number: int, line: str, specs: list[str], dropped: list[tuple[str, str, str]]) -> None:
    try:
        spec = carry_over(line)
    except InputError as exc:
        raise InputError(f"{path}:{number}: {exc}") from None
    if spec is not None:
        specs.append(spec)
        return
    name = spec_name(line.split("=", 1)[0])
    version = line.split("=")[1] if "=" in line else ""
    dropped.append((name, version, macos_only_reason(name) or "exists only for macOS"))
