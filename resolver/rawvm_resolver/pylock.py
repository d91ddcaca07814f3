"""PEP 751 pylock.toml for the bundle: uv's resolution, normalised.

Target wheels only (the sdist is kept only where the target has no wheel), sha256 on every artifact,
local packages as paths into ``wheels/``, no timestamps or command lines, so equal inputs give equal bytes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import tomli_w

from rawvm_resolver.errors import ResolverError
from rawvm_resolver.target import Target

_ARTIFACT_KEYS = ("name", "url", "path", "size", "upload-time", "hashes")


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


def build_pylock(uv_lock: dict[str, Any], target: Target, local: list[LocalArtifact]) -> dict[str, Any]:
    packages: list[dict[str, Any]] = []
    for package in uv_lock.get("packages", []):
        packages.append(_normalise(package))
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


def dumps(document: dict[str, Any]) -> str:
    return tomli_w.dumps(document)


def is_sdist_only(entry: dict[str, Any]) -> bool:
    return "sdist" in entry and "wheels" not in entry
