"""Scan an installed environment: the running one, an interpreter, a venv, or a bare site-packages directory.

The environment need not be runnable here: a macOS venv copied to Linux scans the same, because everything
comes from the ``*.dist-info`` files (METADATA, WHEEL, INSTALLER, REQUESTED, direct_url.json).
"""

from __future__ import annotations

import json
import os
import platform as _platform
import re
import subprocess
import sys
import sysconfig
from importlib.metadata import PathDistribution
from pathlib import Path

from rawvm_resolver.environment import Distribution, Environment, Source, SourcePlatform, canonical, requirement_edge
from rawvm_resolver.errors import InputError
from rawvm_resolver.inputs import find_in_directory, read_input
from rawvm_resolver.platforms import describe_platform, dominant_platform, python_from_tags

_ACCEPTED = (
    "an interpreter, a venv, a site-packages directory, a requirements file, a pyproject.toml project, a lock "
    "(uv.lock, poetry.lock, pdm.lock, Pipfile.lock, pylock.toml, conda-lock.yml), or a conda environment.yml / prefix"
)

_FILE_INPUT_SUFFIXES = (".txt", ".in", ".toml", ".lock", ".yml", ".yaml", ".json")

# Run inside a foreign interpreter to learn where its packages live.
_PROBE = (
    "import json, platform, sys, sysconfig; "
    "print(json.dumps({'python': platform.python_version(), 'platform': sysconfig.get_platform(), "
    "'libc': platform.libc_ver()[1], 'paths': sorted({sysconfig.get_paths()['purelib'], "
    "sysconfig.get_paths()['platlib']})}))"
)


def scan(source: str | Path | None) -> Environment:
    """Scan whatever ``source`` names (None: the running environment) into an Environment."""
    if source is None:
        return _scan_running()
    path = Path(source).expanduser()
    if not path.exists():
        raise InputError(f"{source}: no such file or directory; pass {_ACCEPTED}")
    if path.is_file():
        if path.suffix not in _FILE_INPUT_SUFFIXES and os.access(path, os.X_OK):
            return _scan_interpreter(path)  # python, python3.11, python.exe, ...
        return read_input(path)
    if (path / "conda-meta").is_dir():
        return read_input(path)  # a conda prefix: the conda helper reads it
    if (path / "pyvenv.cfg").is_file():
        return _scan_venv(path)
    if any(path.glob("*.dist-info")):
        return scan_site_packages(path, origin=str(path))
    found = find_in_directory(path)
    if found is not None:
        return read_input(found)
    raise InputError(f"{source} is no Python environment or project: pass {_ACCEPTED}")


def _scan_running() -> Environment:
    paths = sorted({sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]})
    platform_tag = _wheel_platform(sysconfig.get_platform())
    return _scan_paths(
        [Path(p) for p in paths],
        origin="running environment",
        python=_platform.python_version(),
        platform_tag=platform_tag,
        libc=_platform.libc_ver()[1],
    )


def _scan_interpreter(interpreter: Path) -> Environment:
    try:
        completed = subprocess.run(
            [str(interpreter), "-c", _PROBE], capture_output=True, text=True, timeout=60, check=True
        )
        probe = json.loads(completed.stdout)
    except (OSError, subprocess.SubprocessError, json.JSONDecodeError) as exc:
        raise InputError(f"{interpreter} is not a Python interpreter that runs here ({exc}); pass {_ACCEPTED}") from exc
    return _scan_paths(
        [Path(p) for p in probe["paths"]],
        origin=str(interpreter),
        python=probe["python"],
        platform_tag=_wheel_platform(probe["platform"]),
        libc=probe["libc"],
    )


def _scan_venv(venv: Path) -> Environment:
    config = _read_pyvenv_cfg(venv / "pyvenv.cfg")
    site_dirs = sorted({*venv.glob("lib/python3*/site-packages"), *venv.glob("Lib/site-packages")})
    if not site_dirs:
        raise InputError(f"{venv} has a pyvenv.cfg but no site-packages directory; is the venv complete?")
    python = config.get("version_info") or config.get("version") or ""
    return _scan_paths(site_dirs, origin=str(venv), python=python, platform_tag="", libc="")


def scan_site_packages(site_dir: Path, *, origin: str) -> Environment:
    return _scan_paths([site_dir], origin=origin, python="", platform_tag="", libc="")


def _scan_paths(site_dirs: list[Path], *, origin: str, python: str, platform_tag: str, libc: str) -> Environment:
    distributions: dict[str, Distribution] = {}
    for site_dir in site_dirs:
        for meta_dir in sorted([*site_dir.glob("*.dist-info"), *site_dir.glob("*.egg-info")]):
            dist = read_distribution(meta_dir)
            if dist is not None:
                distributions.setdefault(dist.name, dist)
    if not distributions:
        raise InputError(f"{origin}: no installed distributions found; pass {_ACCEPTED}")
    all_tags = [tag for dist in distributions.values() for tag in dist.wheel_tags]
    if not platform_tag:
        platform_tag = dominant_platform(all_tags)
    if not python:
        python = _python_from_paths(site_dirs) or python_from_tags(all_tags)
    if not python:
        raise InputError(f"{origin}: cannot tell which Python this environment is for; pass --python X.Y")
    os_name, arch, version = describe_platform(platform_tag)
    return Environment(
        origin=origin,
        kind="environment",
        platform=SourcePlatform(python=python, platform=platform_tag, os=os_name, arch=arch, libc=libc or version),
        distributions=tuple(sorted(mark_implied_requests(distributions).values(), key=lambda d: d.name)),
    )


def read_distribution(meta_dir: Path) -> Distribution | None:
    """One ``*.dist-info`` (or ``*.egg-info``) directory as a Distribution; None when it has no name."""
    dist = PathDistribution(meta_dir)
    metadata = dist.metadata
    name, version = metadata["Name"], metadata["Version"]
    if not name or not version:
        return None
    wheel_text = dist.read_text("WHEEL") or ""
    return Distribution(
        name=canonical(name),
        display_name=name,
        version=version,
        installer=(dist.read_text("INSTALLER") or "").strip(),
        requested=(meta_dir / "REQUESTED").exists(),
        source=_read_direct_url(dist.read_text("direct_url.json")),
        requires=tuple(metadata.get_all("Requires-Dist") or ()),
        wheel_tags=tuple(line.split(":", 1)[1].strip() for line in wheel_text.splitlines() if line.startswith("Tag:")),
    )


def mark_implied_requests(distributions: dict[str, Distribution]) -> dict[str, Distribution]:
    """Mark as requested every distribution nothing needs unconditionally-but-for-platform.

    A package only an *extra* pulls in (``dask[dataframe]`` → pandas) would vanish if we asked uv for its parent
    alone, so it becomes a requirement too. One needed behind a platform marker (ipykernel → appnope on Darwin)
    stays a dependency: uv keeps or drops it for the target by itself.
    """
    needed: set[str] = set()
    for dist in distributions.values():
        for line in dist.requires:
            edge = requirement_edge(line)
            if edge is None or "extra" in edge[1]:
                continue
            needed.add(edge[0])
    result: dict[str, Distribution] = {}
    for name, dist in distributions.items():
        if not dist.requested and name not in needed:
            dist = Distribution(**{**dist.__dict__, "requested": True})
        result[name] = dist
    return result


def _read_direct_url(text: str | None) -> Source:
    if not text:
        return Source()
    try:
        data = json.loads(text)
    except json.JSONDecodeError:
        return Source()
    url = str(data.get("url", ""))
    if "vcs_info" in data:
        vcs = data["vcs_info"]
        return Source(kind="vcs", url=f"{vcs.get('vcs', 'git')}+{url}", commit=str(vcs.get("commit_id", "")))
    if "dir_info" in data:
        kind = "editable" if data["dir_info"].get("editable") else "directory"
        return Source(kind=kind, url=url)
    if "archive_info" in data:
        return Source(kind="archive", url=url)
    return Source()


def _read_pyvenv_cfg(path: Path) -> dict[str, str]:
    values: dict[str, str] = {}
    for line in path.read_text(errors="replace").splitlines():
        key, sep, value = line.partition("=")
        if sep:
            values[key.strip()] = value.strip()
    return values


def _python_from_paths(site_dirs: list[Path]) -> str:
    for site_dir in site_dirs:
        for part in site_dir.parts:
            if match := re.fullmatch(r"python(3\.\d+)t?", part):
                return match.group(1)
    return ""


def _wheel_platform(sysconfig_platform: str) -> str:
    """``macosx-14.0-arm64`` → ``macosx_14_0_arm64``; ``linux-x86_64`` → ``linux_x86_64``."""
    return re.sub(r"[-.]", "_", sysconfig_platform)


def running_python() -> str:
    return f"{sys.version_info.major}.{sys.version_info.minor}"
