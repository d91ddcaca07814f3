"""Inputs that are files, not installs: requirements files, pyproject.toml / uv.lock projects, conda environments.

Each becomes the same typed Environment a scanned install does: exact pins are distributions (which the lock
keeps as constraints), everything else stays a requested requirement string.
"""

from __future__ import annotations

import re
import shlex
import tomllib
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from packaging.requirements import InvalidRequirement
from packaging.requirements import Requirement as PepRequirement

from rawvm_resolver.environment import Distribution, Environment, Source, SourcePlatform, canonical, parse_requirement
from rawvm_resolver.errors import InputError
from rawvm_resolver.python_choice import choose_python

_CONDA_FILE = re.compile(r".*\.ya?ml$")


def running_platform() -> SourcePlatform:
    """File inputs say nothing about the machine: assume this Python, no platform."""
    import platform

    return SourcePlatform(python=platform.python_version(), platform="", python_from="the running Python")


def _platform_from_markers(requirements: list[str], dists: Iterable[Distribution] = ()) -> SourcePlatform:
    """A requirements file records no Python, but the cp3XX tags of the wheel files it names (a cached or
    conda-built wheel's path) and its ``python_version`` markers may tell it."""
    markers = [str(req.marker) for req in map(parse_requirement, requirements) if req is not None and req.marker]
    wheels = [[url.rsplit("/", 1)[-1]] for url in (dist.source.url for dist in dists) if url.endswith(".whl")]
    choice = choose_python(markers=markers, wheel_names=wheels)
    return SourcePlatform(python=choice.python, platform="", python_from=choice.reason)


def read_file_input(path: Path) -> Environment:
    if path.is_file() and not _CONDA_FILE.fullmatch(path.name):
        from rawvm_resolver.conda.lists import conda_list_kind, read_conda_list  # lazy, as below

        if conda_list_kind(path) is not None:  # by content: these are often named requirements.txt
            return conda_environment(read_conda_list(path), origin=str(path))
    if path.is_dir() and (path / "conda-meta").is_dir():
        from rawvm_resolver import conda  # lazy: the conda part is optional and owns its own dependencies

        return conda_environment(conda.scan_conda_prefix(path), origin=str(path))
    if _CONDA_FILE.fullmatch(path.name):
        from rawvm_resolver import conda

        return conda_environment(conda.read_environment_yml(path), origin=str(path))
    if path.suffix in (".txt", ".in") or path.name.startswith("requirements"):
        lines = _read_requirement_file(path, set())
        dists, requirements = parse_requirement_lines(lines, path.parent, hints=editable_pins(path.read_text()))
        return Environment(
            origin=str(path),
            kind="requirements",
            platform=_platform_from_markers(requirements, dists.values()),
            distributions=tuple(sorted(dists.values(), key=lambda d: d.name)),
            requirements=tuple(requirements),
        )
    raise InputError(
        f"{path}: not an input rawvm reads; pass a requirements .txt, pyproject.toml, uv.lock, environment.yml, "
        "an interpreter, a venv or a site-packages directory"
    )


def requirement_file_indexes(path: Path) -> tuple[str, tuple[str, ...]]:
    """The ``--index-url`` ("" when none) and ``--extra-index-url`` values a requirements file (and its ``-r``
    includes) names: the lock resolves from its own indexes, but asking the file's for wheels is truer to it."""
    index_url, extras = "", []
    for line in _read_requirement_file(path, set()):
        words = shlex.split(line)
        for option, value in zip(words, [*words[1:], ""], strict=True):
            name, _, inline = option.partition("=")
            url = inline or value
            if name in ("-i", "--index-url") and url:
                index_url = url
            elif name == "--extra-index-url" and url:
                extras.append(url)
    return index_url, tuple(extras)


def _read_requirement_file(path: Path, seen: set[Path]) -> list[str]:
    """Logical lines of a requirements file, with ``-r`` includes expanded and comments removed."""
    if path.resolve() in seen:
        return []
    seen.add(path.resolve())
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"{path}: cannot read the requirements file ({exc})") from exc
    lines: list[str] = []
    for raw in text.replace("\\\n", " ").splitlines():
        line = re.sub(r"(^|\s)#.*$", "", raw).strip()
        if not line:
            continue
        words = shlex.split(line)
        if words[0] in ("-r", "--requirement") and len(words) > 1:
            lines.extend(_read_requirement_file(path.parent / words[1], seen))
        else:
            lines.append(line)
    return lines


def parse_requirement_lines(
    lines: list[str], base_dir: Path, *, hints: dict[str, str] | None = None
) -> tuple[dict[str, Distribution], list[str]]:
    """Split requirement lines into exact pins (distributions, all requested) and other requirements.

    ``hints``: name -> version for editable lines whose version only a comment records (see editable_pins).
    """
    dists: dict[str, Distribution] = {}
    requirements: list[str] = []
    for line in lines:
        words = shlex.split(line)
        if words[0] in ("-e", "--editable") and len(words) > 1:
            dist = _editable_distribution(words[1], base_dir, hints or {})
            dists[dist.name] = dist
            continue
        if _is_local_path(words[0]):
            dist = _local_distribution(words[0], base_dir)
            dists[dist.name] = dist
            continue
        if words[0].startswith("-"):
            continue  # index options, hashes, constraints files: the lock decides indexes and hashes itself
        quoted = shlex.split(line, posix=False)  # a marker's quotes ('3.11') are part of the requirement
        text = " ".join(word for word in quoted if not word.startswith("--hash"))
        try:
            requirement = PepRequirement(text)
        except InvalidRequirement as exc:
            reason = str(exc).splitlines()[0] if str(exc) else "not PEP 508"  # packaging adds caret lines
            raise InputError(f"invalid requirement {text!r}: {reason} (pip refuses it too)") from exc
        name = canonical(requirement.name)
        pin = _exact_pin(requirement)
        if requirement.url:
            dists[name] = _url_distribution(name, requirement.url, base_dir)
        elif pin and requirement.marker is None:
            dists[name] = Distribution(
                name=name,
                display_name=requirement.name,
                version=pin,
                requested=True,
                extras=tuple(sorted(requirement.extras)),
            )
        else:
            requirements.append(str(requirement))
    return dists, requirements


_EDITABLE_COMMENT = re.compile(r"^#\s*Editable\b.*\(([A-Za-z0-9][\w.-]*)==([^)\s]+)\)", re.MULTILINE)


def editable_pins(text: str) -> dict[str, str]:
    """pip freeze writes ``# Editable install with no version control (pkg==1.0)`` above an ``-e`` path."""
    return {canonical(name): version for name, version in _EDITABLE_COMMENT.findall(text)}


def _editable_distribution(target: str, base_dir: Path, hints: dict[str, str]) -> Distribution:
    """``-e`` of a VCS URL or a local path; the path need not exist here (the translation decides)."""
    url, _, fragment = target.partition("#")
    egg = re.search(r"(?:^|&)egg=([^&]+)", fragment)
    egg_name = egg.group(1) if egg else ""
    if url.startswith(_VCS_PREFIXES):
        base, ref = split_vcs_url(url)
        name = canonical(_egg_project(egg_name) or base.rstrip("/").rsplit("/", 1)[-1].removesuffix(".git"))
        source = Source(kind="vcs", url=base, commit=ref)
        version = hints.get(name, "") or egg_name.removeprefix(_egg_project(egg_name)).removeprefix("-")
        return Distribution(name=name, version=version, requested=True, source=source)
    local = _local_path(url, base_dir)
    name = _local_project_name(local) if local.is_dir() else canonical(_egg_project(egg_name) or local.name)
    suffix = f"#{fragment}" if fragment else ""
    source = Source(kind="editable", url=local.as_uri() + suffix)
    return Distribution(name=name, version=hints.get(name, ""), requested=True, source=source)


_VCS_PREFIXES = ("git+", "hg+", "svn+", "bzr+")


def _egg_project(egg: str) -> str:
    """``pkg`` from ``pkg`` or ``pkg-1.2`` (the version form old pip wrote)."""
    name, dash, version = egg.rpartition("-")
    return name if dash and re.fullmatch(r"\d[\w.+!]*", version) else egg


def split_vcs_url(url: str) -> tuple[str, str]:
    """``git+ssh://git@host/o/r.git@ref`` -> (``git+ssh://git@host/o/r.git``, ``ref``); the ref is after the path."""
    scheme, sep, rest = url.partition("://")
    host, slash, path = rest.partition("/")
    if "@" in path:
        path, _, ref = path.rpartition("@")
        return f"{scheme}{sep}{host}{slash}{path}", ref
    return url, ""


def _local_path(text: str, base_dir: Path) -> Path:
    if text.startswith("file:"):
        from urllib.parse import unquote, urlparse

        text = unquote(urlparse(text).path)
    path = Path(text).expanduser()
    return path if path.is_absolute() else (base_dir / path).resolve()


def _exact_pin(requirement: PepRequirement) -> str:
    specs = list(requirement.specifier)
    if len(specs) == 1 and specs[0].operator in ("==", "===") and "*" not in specs[0].version:
        return specs[0].version
    return ""


def _url_distribution(name: str, url: str, base_dir: Path) -> Distribution:
    if url.startswith("file:"):
        from urllib.parse import unquote, urlparse

        local = Path(unquote(urlparse(url).path))
        local = local if local.is_absolute() else (base_dir / local).resolve()
        kind = "directory" if local.is_dir() else "archive"
        return Distribution(name=name, version="", requested=True, source=Source(kind=kind, url=local.as_uri()))
    if url.startswith(_VCS_PREFIXES):
        base, commit = split_vcs_url(url.partition("#")[0])
        return Distribution(name=name, version="", requested=True, source=Source(kind="vcs", url=base, commit=commit))
    if forge := forge_archive(url):
        base, ref = forge
        return Distribution(name=name, version="", requested=True, source=Source(kind="vcs", url=base, commit=ref))
    return Distribution(name=name, version="", requested=True, source=Source(kind="archive", url=url))


# https://github.com/o/r/archive/refs/heads/develop.zip, https://gitlab.com/o/r/-/archive/main/r-main.tar.gz
_FORGE_ARCHIVE = re.compile(
    r"https?://(?P<host>github\.com|gitlab\.com)/(?P<repo>[^/]+/[^/]+?)/(?:-/)?archive/"
    r"(?:refs/(?:heads|tags)/)?(?P<ref>[^/]+?)(?:/[^/]+)?\.(?:zip|tar\.gz|tgz)"
)


_FORGE_DOWNLOAD = re.compile(
    r"https?://(github\.com/[^/]+/[^/]+/releases/download/|gitlab\.com/.+/-/(releases|package_files)/"
    r"|objects\.githubusercontent\.com/|raw\.githubusercontent\.com/)"
)


def is_forge_download(url: str) -> bool:
    """A file a code forge serves (a GitHub release asset such as spaCy's models): like a VCS source, the VM
    may not reach the forge, so by default the index release of the same name replaces it."""
    return bool(_FORGE_DOWNLOAD.match(url))


def forge_archive(url: str) -> tuple[str, str] | None:
    """A GitHub / GitLab archive URL as the repository and ref it snapshots (a branch archive moves like a
    VCS ref, and the VM may not reach the forge): (``git+https://host/o/r.git``, ref), or None."""
    match = _FORGE_ARCHIVE.fullmatch(url.partition("#")[0])
    if match is None:
        return None
    return f"git+https://{match.group('host')}/{match.group('repo')}.git", match.group("ref")


def _is_local_path(word: str) -> bool:
    """``.``, ``./sub``, ``../x``, ``/abs/dir``, ``~/x``: pip installs a local project from a bare path."""
    return word in (".", "..") or word.startswith(("./", "../", "/", "~"))


def _local_distribution(text: str, base_dir: Path) -> Distribution:
    """A bare path (``- .`` in an environment.yml's pip section): the local project relative to the file."""
    local = _local_path(text, base_dir)
    if local.is_file():
        name = canonical(local.name.split("-")[0])  # a wheel or sdist file name starts with the project's
        return Distribution(name=name, version="", requested=True, source=Source(kind="archive", url=local.as_uri()))
    return Distribution(
        name=_local_project_name(local), version="", requested=True, source=Source("directory", local.as_uri())
    )


def _local_project_name(path: Path) -> str:
    pyproject = path / "pyproject.toml"
    if pyproject.is_file():
        try:
            data = tomllib.loads(pyproject.read_text())
        except (OSError, tomllib.TOMLDecodeError):
            data = {}
        name = data.get("project", {}).get("name") or data.get("tool", {}).get("poetry", {}).get("name")
        if name:
            return canonical(str(name))
    return canonical(path.name)


def load_toml(path: Path) -> dict[str, Any]:
    try:
        return tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise InputError(f"{path}: cannot read it as TOML ({exc})") from exc


def conda_environment(conda_input: Any, *, origin: str) -> Environment:
    dists, requirements = parse_requirement_lines(list(conda_input.pip_requirements), Path(origin).parent)
    python, python_from = "", ""
    for spec in conda_input.specs:
        if match := re.fullmatch(r"python\s*=?=?\s*(3\.\d+(?:\.\d+)?)[.*]*(?:\s.*)?", str(spec).strip()):
            python, python_from = match.group(1), f"the conda python pin {str(spec).strip()}"
    if not python:
        fallback = _platform_from_markers(requirements, dists.values())
        python, python_from = fallback.python, fallback.python_from
    os_name, _, arch = str(getattr(conda_input, "subdir", "")).partition("-")
    platform = SourcePlatform(
        python=python,
        python_from=python_from,
        platform="",
        os={"osx": "macos", "win": "windows"}.get(os_name, os_name),
        arch={"64": "x86_64"}.get(arch, arch),
    )
    return Environment(
        origin=origin,
        kind="conda",
        platform=platform,
        distributions=tuple(sorted(dists.values(), key=lambda d: d.name)),
        requirements=tuple(requirements),
        conda=conda_input,
    )
