"""Inputs that are files, not installs: requirements files, pyproject.toml / uv.lock projects, conda environments.

Each becomes the same typed Environment a scanned install does: exact pins are distributions (which the lock
keeps as constraints), everything else stays a requested requirement string.
"""

from __future__ import annotations

import re
import shlex
import tomllib
from pathlib import Path
from typing import Any

from packaging.requirements import InvalidRequirement
from packaging.requirements import Requirement as PepRequirement

from rawvm_resolver.environment import Distribution, Environment, Source, SourcePlatform, canonical
from rawvm_resolver.errors import InputError

_CONDA_FILE = re.compile(r".*\.ya?ml$")


def running_platform() -> SourcePlatform:
    """File inputs say nothing about the machine: assume this Python, no platform."""
    import platform

    return SourcePlatform(python=platform.python_version(), platform="")


def read_file_input(path: Path) -> Environment:
    if path.is_file() and not _CONDA_FILE.fullmatch(path.name):
        from rawvm_resolver.conda.lists import conda_list_kind, read_conda_list  # lazy, as below

        if conda_list_kind(path) is not None:  # by content: these are often named requirements.txt
            return _conda_environment(read_conda_list(path), origin=str(path))
    if path.is_dir() and (path / "conda-meta").is_dir():
        from rawvm_resolver import conda  # lazy: the conda part is optional and owns its own dependencies

        return _conda_environment(conda.scan_conda_prefix(path), origin=str(path))
    if path.name == "uv.lock":
        return read_uv_lock(path)
    if path.name == "pyproject.toml":
        return read_uv_lock(path.with_name("uv.lock")) if path.with_name("uv.lock").exists() else read_pyproject(path)
    if _CONDA_FILE.fullmatch(path.name):
        from rawvm_resolver import conda

        return _conda_environment(conda.read_environment_yml(path), origin=str(path))
    if path.suffix in (".txt", ".in") or path.name.startswith("requirements"):
        lines = _read_requirement_file(path, set())
        dists, requirements = parse_requirement_lines(lines, path.parent, hints=editable_pins(path.read_text()))
        return Environment(
            origin=str(path),
            kind="requirements",
            platform=running_platform(),
            distributions=tuple(sorted(dists.values(), key=lambda d: d.name)),
            requirements=tuple(requirements),
        )
    raise InputError(
        f"{path}: not an input rawvm reads; pass a requirements .txt, pyproject.toml, uv.lock, environment.yml, "
        "an interpreter, a venv or a site-packages directory"
    )


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
        if words[0].startswith("-"):
            continue  # index options, hashes, constraints files: the lock decides indexes and hashes itself
        text = " ".join(word for word in words if not word.startswith("--hash"))
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


def _local_project_name(path: Path) -> str:
    pyproject = path / "pyproject.toml"
    if pyproject.is_file():
        data = tomllib.loads(pyproject.read_text())
        if name := data.get("project", {}).get("name"):
            return canonical(str(name))
    return canonical(path.name)


def read_pyproject(path: Path) -> Environment:
    data = _load_toml(path)
    project: dict[str, Any] = data.get("project", {})
    requirements = [str(PepRequirement(line)) for line in project.get("dependencies", [])]
    dists: dict[str, Distribution] = {}
    if _is_package(data) and project.get("name"):
        name = canonical(str(project["name"]))
        dists[name] = Distribution(
            name=name, version="", requested=True, source=Source(kind="editable", url=path.parent.resolve().as_uri())
        )
    return Environment(
        origin=str(path),
        kind="project",
        platform=_project_platform(path.parent, project),
        distributions=tuple(sorted(dists.values(), key=lambda d: d.name)),
        requirements=tuple(requirements),
    )


def read_uv_lock(path: Path) -> Environment:
    """A uv.lock: registry packages are pins; the root project's (and members') dependencies are requested."""
    data = _load_toml(path)
    packages: list[dict[str, Any]] = data.get("package", [])
    counts: dict[str, int] = {}
    for package in packages:
        counts[canonical(package["name"])] = counts.get(canonical(package["name"]), 0) + 1
    requested: set[str] = set()
    extras: dict[str, set[str]] = {}
    dists: dict[str, Distribution] = {}
    for package in packages:
        name, source = canonical(package["name"]), package.get("source", {})
        local = source.get("editable") or source.get("virtual") or source.get("directory")
        if local is not None:
            # `uv sync` installs the dev group by default, so the environment the user runs has it too.
            wanted = [*package.get("dependencies", []), *package.get("dev-dependencies", {}).get("dev", [])]
            for dep in wanted:
                requested.add(canonical(dep["name"]))
                extras.setdefault(canonical(dep["name"]), set()).update(dep.get("extra", []))
            if "virtual" not in source:
                directory = (path.parent / local).resolve()
                dists[name] = Distribution(
                    name=name, version="", requested=True, source=Source(kind="editable", url=directory.as_uri())
                )
        elif counts[name] == 1 and "version" in package:
            # A universal lock may hold several versions of one package (per platform): those stay unpinned.
            dists[name] = Distribution(name=name, display_name=package["name"], version=str(package["version"]))
    for name in requested:
        if name in dists and not dists[name].requested:
            chosen = tuple(sorted(extras.get(name, ())))
            dists[name] = Distribution(**{**dists[name].__dict__, "requested": True, "extras": chosen})
    pyproject = path.with_name("pyproject.toml")
    project = _load_toml(pyproject).get("project", {}) if pyproject.exists() else {}
    return Environment(
        origin=str(path),
        kind="project",
        platform=_project_platform(path.parent, project),
        distributions=tuple(sorted(dists.values(), key=lambda d: d.name)),
    )


def _is_package(data: dict[str, Any]) -> bool:
    package = data.get("tool", {}).get("uv", {}).get("package")
    return bool(package) if package is not None else "build-system" in data


def _project_platform(directory: Path, project: dict[str, Any]) -> SourcePlatform:
    pinned = directory / ".python-version"
    if pinned.is_file() and re.fullmatch(r"3\.\d+(\.\d+)?", pinned.read_text().strip()):
        return SourcePlatform(python=pinned.read_text().strip(), platform="")
    return running_platform()


def _load_toml(path: Path) -> dict[str, Any]:
    try:
        return tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise InputError(f"{path}: cannot read it as TOML ({exc})") from exc


def _conda_environment(conda_input: Any, *, origin: str) -> Environment:
    dists, requirements = parse_requirement_lines(list(conda_input.pip_requirements), Path(origin).parent)
    python = ""
    for spec in conda_input.specs:
        if match := re.fullmatch(r"python\s*=?=?\s*(3\.\d+(?:\.\d+)?)[.*]*(?:\s.*)?", str(spec).strip()):
            python = match.group(1)
    os_name, _, arch = str(getattr(conda_input, "subdir", "")).partition("-")
    platform = SourcePlatform(
        python=python or running_platform().python,
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
