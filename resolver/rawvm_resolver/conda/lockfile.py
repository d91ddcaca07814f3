"""Write solved conda records as a conda-lock v1 ``conda-lock.yml``.

rattler's LockFile writes only its own (pixi) format, so the v1 document is written here with PyYAML; it is
read back by both ``rattler.LockFile.from_path`` and conda-lock (tests check both). Deterministic: packages
sorted by name, dependency maps sorted, no timestamps.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from typing import Any

import yaml
from rattler import MatchSpec, RepoDataRecord

from rawvm_resolver.errors import ResolverError

FORMAT_VERSION = 1


def render_conda_lock(
    records: Sequence[RepoDataRecord],
    *,
    platform: str,
    channels: Sequence[str],
    specs: Sequence[str],
    virtual_packages: Sequence[str],
) -> bytes:
    packages = sorted((locked_package(record, platform) for record in records), key=lambda p: str(p["name"]))
    document: dict[str, Any] = {
        "version": FORMAT_VERSION,
        "metadata": {
            "content_hash": {platform: content_hash(platform, channels, specs, virtual_packages)},
            "channels": [{"url": channel, "used_env_vars": []} for channel in channels],
            "platforms": [platform],
            "sources": [],
            # What was solved, so the lock explains itself (conda-lock's place for tool-specific notes).
            "custom_metadata": {
                "rawvm.specs": ", ".join(specs),
                "rawvm.virtual_packages": ", ".join(virtual_packages),
            },
        },
        "package": packages,
    }
    return yaml.safe_dump(document, sort_keys=False, default_flow_style=False, width=1000).encode()


def content_hash(platform: str, channels: Sequence[str], specs: Sequence[str], virtual: Sequence[str]) -> str:
    """sha256 of the solve's inputs: same inputs, same hash (conda-lock uses it to tell a stale lock)."""
    payload = {"channels": list(channels), "platform": platform, "specs": sorted(specs), "virtual": sorted(virtual)}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def locked_package(record: RepoDataRecord, platform: str) -> dict[str, Any]:
    """One conda-lock v1 ``package`` entry; noarch packages carry the target platform, as conda-lock writes."""
    name = str(record.name.normalized)
    if record.md5 is None:
        raise ResolverError(f"conda package {name} has no md5 in its channel's repodata; conda-lock requires one")
    hashes = {"md5": record.md5.hex()}
    if record.sha256 is not None:
        hashes["sha256"] = record.sha256.hex()
    return {
        "name": name,
        "version": str(record.version),
        "manager": "conda",
        "platform": platform,
        "dependencies": dependency_map(record.depends),
        "url": str(record.url),
        "hash": hashes,
        "category": "main",
        "optional": False,
        "build": str(record.build),
    }


def dependency_map(depends: Sequence[str]) -> dict[str, str]:
    """conda-lock's form of a record's depends: name → version spec ("" for any); build constraints dropped."""
    merged: dict[str, list[str]] = {}
    for dependency in depends:
        spec = MatchSpec(dependency)
        versions = merged.setdefault(str(spec.name.normalized), [])
        if spec.version is not None and str(spec.version) not in versions:
            versions.append(str(spec.version))
    return {name: ",".join(versions) for name, versions in sorted(merged.items())}
