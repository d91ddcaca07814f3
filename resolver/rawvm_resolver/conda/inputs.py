"""Read the conda part of an environment: a ``conda env export`` file, or a conda prefix on disk."""

from __future__ import annotations

import json
import shlex
from collections import Counter
from dataclasses import dataclass
from email.parser import HeaderParser
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit
from urllib.request import url2pathname

import yaml

from rawvm_resolver.conda.history import requested_specs
from rawvm_resolver.conda.specs import (
    carry_over,
    drop_build_string,
    expand_channels,
    macos_only_reason,
    normalize_channel,
    spec_name,
)
from rawvm_resolver.errors import InputError


@dataclass(frozen=True)
class CondaInput:
    channels: tuple[str, ...]  # in priority order; empty: the lock's default channels
    specs: tuple[str, ...]  # MatchSpec strings to solve for the target, build strings removed
    pip_requirements: tuple[str, ...]  # the `- pip:` section (of a prefix: what pip installed); locked by uv
    subdir: str = ""  # the source's conda subdir when the input names it (osx-arm64), else ""
    dropped: tuple[tuple[str, str, str], ...] = ()  # (name, version, reason): macOS-only packages left out


def read_environment_yml(path: Path) -> CondaInput:
    """Read an environment.yml (``conda env export`` format, ``--from-history`` or hand-written)."""
    document = _load_yaml(path)
    channels = _string_list(document.get("channels") or [], path, "channels")
    specs: list[str] = []
    pip: list[str] = []
    dropped: list[tuple[str, str, str]] = []
    for item in document.get("dependencies") or []:
        if isinstance(item, dict) and set(item) == {"pip"}:
            pip += _string_list(item["pip"] or [], path, "pip")
        elif isinstance(item, str):
            spec = carry_over(item)
            if spec is not None:
                specs.append(spec)
            else:
                name = spec_name(drop_build_string(item))
                dropped.append((name, _pinned_version(item), macos_only_reason(name) or "exists only for macOS"))
        else:
            raise InputError(f"{path}: unexpected dependency entry {item!r}; list MatchSpec strings and one '- pip:'")
    return CondaInput(
        channels=expand_channels(channels),
        specs=tuple(specs),
        pip_requirements=tuple(pip),
        subdir=_export_subdir(document),
        dropped=tuple(dropped),
    )


def _pinned_version(spec: str) -> str:
    parts = spec.strip().split("=")
    return parts[1] if len(parts) >= 2 else ""


def _export_subdir(document: dict[str, Any]) -> str:
    """``osx-arm64`` / ``osx-64`` when a `conda env export` says it came from a Mac (its prefix or its builds)."""
    prefix = str(document.get("prefix") or "")
    builds = " ".join(str(item) for item in document.get("dependencies") or [] if isinstance(item, str))
    if "osxarm64" in builds or "/opt/homebrew/" in prefix:
        return "osx-arm64"
    if "osx64" in builds:
        return "osx-64"
    return "osx" if prefix.startswith("/Users/") else ""  # a Mac, arch unknown


def scan_conda_prefix(prefix: Path) -> CondaInput:
    """Read a conda environment: the specs its history asked for (else every package pinned), and what pip added."""
    meta = prefix / "conda-meta"
    if not meta.is_dir():
        raise InputError(f"{prefix} is no conda environment (no conda-meta/); pass the prefix of a conda env")
    records = [_load_record(path) for path in sorted(meta.glob("*.json"))]
    if not records:
        raise InputError(f"{prefix} is an empty conda environment (conda-meta/ has no package records)")
    history = meta / "history"
    asked = requested_specs(history.read_text(errors="replace").splitlines(), spec_name) if history.is_file() else []
    if not asked:  # rattler/pixi prefixes record the request per package instead
        asked = [spec for record in records for spec in _record_requests(record)]
    if not asked:
        asked = [f"{record['name']} =={record['version']}" for record in records]
    specs = [spec for spec in map(carry_over, asked) if spec is not None]
    return CondaInput(
        channels=_channels_by_use(records), specs=tuple(specs), pip_requirements=pip_installed(prefix, records)
    )


def pip_installed(prefix: Path, records: list[dict[str, Any]]) -> tuple[str, ...]:
    """The prefix's pip section: distributions in site-packages that no conda record owns (as `conda list` tells)."""
    owned = {str(path) for record in records for path in record.get("files") or []}
    lines = []
    for dist_info in sorted(prefix.glob("lib/python3*/site-packages/*.dist-info")):
        if f"{dist_info.relative_to(prefix).as_posix()}/METADATA" in owned:
            continue
        try:
            metadata = HeaderParser().parsestr((dist_info / "METADATA").read_text(errors="replace"))
        except OSError:
            continue  # a broken leftover directory, not an installed distribution
        if metadata["Name"] and metadata["Version"]:
            lines.append(_requirement_line(dist_info, metadata["Name"], metadata["Version"]))
    return tuple(lines)


def _requirement_line(dist_info: Path, name: str, version: str) -> str:
    """``name==version``, or where PEP 610's direct_url.json says so an editable path or a direct URL."""
    try:
        direct = json.loads((dist_info / "direct_url.json").read_text())
    except (OSError, json.JSONDecodeError):
        return f"{name}=={version}"
    url = str(direct.get("url", ""))
    if direct.get("dir_info", {}).get("editable") and url.startswith("file://"):
        return f"-e {shlex.quote(url2pathname(urlsplit(url).path))}"
    if vcs := direct.get("vcs_info"):
        return f"{name} @ {vcs.get('vcs', 'git')}+{url}@{vcs.get('commit_id', '')}".rstrip("@")
    return f"{name} @ {url}" if url else f"{name}=={version}"


def _load_yaml(path: Path) -> dict[str, Any]:
    try:
        document = yaml.safe_load(path.read_text())
    except OSError as exc:
        raise InputError(f"{path}: cannot read ({exc.strerror}); pass an environment.yml") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise InputError(f"{path}: invalid YAML{where}; fix the file or export it again (conda env export)") from None
    if not isinstance(document, dict):
        raise InputError(f"{path} is no environment.yml (expected a mapping with 'dependencies')")
    return document


def _string_list(value: object, path: Path, key: str) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
        raise InputError(f"{path}: '{key}' must be a list of strings")
    return list(value)


def _load_record(path: Path) -> dict[str, Any]:
    try:
        record = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise InputError(
            f"{path}: unreadable conda package record ({exc}); repair or recreate the environment"
        ) from None
    if not isinstance(record, dict) or not {"name", "version"} <= set(record):
        raise InputError(f"{path}: not a conda package record (no name/version)")
    return record


def _record_requests(record: dict[str, Any]) -> list[str]:
    specs = record.get("requested_specs") or []
    single = record.get("requested_spec")
    return [str(spec) for spec in [*specs, *([single] if single else [])]]


def _record_channel(record: dict[str, Any]) -> str:
    channel = str(record.get("channel") or "")
    if not channel and record.get("url"):
        channel = str(record["url"]).rsplit("/", 1)[0]  # the subdir URL; normalize_channel strips the subdir
    return normalize_channel(channel) if channel else ""


def _channels_by_use(records: list[dict[str, Any]]) -> tuple[str, ...]:
    # The channel most packages came from first: with strict priority it is where a package is looked up first.
    counts = Counter(channel for channel in map(_record_channel, records) if channel and channel != "pypi")
    return tuple(name for name, _ in sorted(counts.items(), key=lambda item: (-item[1], item[0])))
