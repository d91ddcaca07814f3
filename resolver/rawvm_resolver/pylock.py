"""PEP 751 pylock.toml for the bundle: uv's resolution, normalised.

Target wheels only (the sdist is kept only where the target has no wheel), sha256 on every artifact,
local packages as paths into ``wheels/``, no timestamps or command lines, so equal inputs give equal bytes.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import tomli_w

from rawvm_resolver.errors import ResolverError
from rawvm_resolver.target import Target

_ARTIFACT_KEYS = ("name", "url", "path", "size", "upload-time", "hashes")
PYPI_SIMPLE = "https://pypi.org/simple"
_PYPI_FILES_HOST = "files.pythonhosted.org"


@dataclass(frozen=True)
class LocalArtifact:
    name: str  # canonical distribution name
    version: str
    path: str  # relative to the bundle, e.g. wheels/pkg-1.0-py3-none-any.whl
    sha256: str
    size: int
    is_sdist: bool


def environment_marker(target: Target) -> str:
    return f"sys_platform == 'linux' and platform_machine == '{target.arch}'"


def build_pylock(
    uv_lock: dict[str, Any], target: Target, local: list[LocalArtifact], indexes: Sequence[str] = ()
) -> dict[str, Any]:
    """``indexes``: the extra index URLs the resolution used, so each package can name the index it came from."""
    packages: list[dict[str, Any]] = []
    for package in uv_lock.get("packages", []):
        normalised = _normalise(package)
        index = normalised.get("index") or index_of(normalised, indexes)
        if index:
            normalised["index"] = index
        packages.append(normalised)
    for artifact in local:
        entry: dict[str, Any] = {"name": artifact.name, "version": artifact.version}
        file = {
            "name": artifact.path.rsplit("/", 1)[-1],
            "path": artifact.path,
            "size": artifact.size,
            "hashes": {"sha256": artifact.sha256},
        }
        if artifact.is_sdist:
            entry["sdist"] = file
        else:
            entry["wheels"] = [file]
        packages.append(entry)
    packages.sort(key=lambda entry: (entry["name"], entry.get("version", "")))
    return {
        "lock-version": "1.0",
        "environments": [environment_marker(target)],
        "requires-python": f"=={target.python}.*",
        "created-by": "rawvm",
        "packages": packages,
    }


def _normalise(package: dict[str, Any]) -> dict[str, Any]:
    name = str(package["name"])
    entry: dict[str, Any] = {"name": name, "version": str(package.get("version", ""))}
    for key in ("marker", "requires-python", "index"):
        if key in package:
            entry[key] = package[key]
    wheels = [_artifact(name, wheel) for wheel in package.get("wheels", [])]
    if wheels:
        entry["wheels"] = sorted(wheels, key=lambda wheel: str(wheel.get("url", wheel.get("path", ""))))
    elif "sdist" in package:
        entry["sdist"] = _artifact(name, package["sdist"])
    elif "vcs" in package or "archive" in package or "directory" in package:
        for key in ("vcs", "archive", "directory"):
            if key in package:
                entry[key] = package[key]
    else:
        raise ResolverError(f"uv's lock has no artifact for {name}: cannot write a hashed pylock.toml")
    return entry


def _artifact(name: str, artifact: dict[str, Any]) -> dict[str, Any]:
    hashes = artifact.get("hashes", {})
    if "sha256" not in hashes:
        where = artifact.get("url") or artifact.get("path") or name
        raise ResolverError(f"the index gave no sha256 for {where}: rawvm only locks artifacts it can verify")
    return {key: artifact[key] for key in _ARTIFACT_KEYS if key in artifact}


def index_of(entry: dict[str, Any], indexes: Sequence[str]) -> str | None:
    """The index a package's wheels came from: PyPI for files.pythonhosted.org, else the index on the same host.

    uv's own pylock output leaves ``index`` out, and ``uv pip sync`` then treats every wheel as a bare URL and
    unpacks it into a new cache entry on each install (a local machine's environment grew the cache by about a GB
    a run); with ``index`` set, uv keys its cache by index and reuses what it unpacked before.
    """
    urls = [str(wheel.get("url", "")) for wheel in entry.get("wheels", [])]
    if "sdist" in entry:
        urls.append(str(entry["sdist"].get("url", "")))
    hosts = {urlsplit(url).netloc for url in urls if url}
    if len(hosts) != 1:
        return None
    host = hosts.pop()
    if host == _PYPI_FILES_HOST:
        return PYPI_SIMPLE
    matching = [index.rstrip("/") for index in indexes if urlsplit(index).netloc == host]
    return matching[0] if len(matching) == 1 else None


def dumps(document: dict[str, Any]) -> str:
    return tomli_w.dumps(document)


def is_sdist_only(entry: dict[str, Any]) -> bool:
    return "sdist" in entry and "wheels" not in entry
