"""A conda-lock ``conda-lock.yml`` (v1) as the conda part of an environment: its pins for one platform.

The lock lists every package once per platform it was solved for. When it was solved for Linux too, that
platform's pins are the ones to keep (they are known to solve there); else the source platform's, with the
macOS-only packages left out as a ``conda list --export`` file's are. ``manager: pip`` entries are the pip part.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from rawvm_resolver.conda.inputs import CondaInput
from rawvm_resolver.conda.specs import carry_over, expand_channels, macos_only_reason, spec_name
from rawvm_resolver.errors import InputError

_PREFERRED = ("linux-64", "linux-aarch64")


def read_conda_lock(path: Path) -> CondaInput:
    try:
        document: dict[str, Any] = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise InputError(f"{path}: cannot read it as a conda-lock file ({exc.__class__.__name__})") from None
    metadata = document.get("metadata") or {}
    platforms = [str(name) for name in metadata.get("platforms") or []]
    entries = [entry for entry in document.get("package") or [] if isinstance(entry, dict)]
    platform = next((name for name in _PREFERRED if name in platforms), platforms[0] if platforms else "")
    specs: list[str] = []
    pip: list[str] = []
    dropped: list[tuple[str, str, str]] = []
    for entry in entries:
        if platform and entry.get("platform") != platform:
            continue
        name, version = str(entry["name"]), str(entry.get("version", ""))
        if entry.get("manager") == "pip":
            pip.append(f"{name}=={version}")
            continue
        spec = carry_over(f"{name}=={version}")
        if spec is None:
            dropped.append((spec_name(name), version, macos_only_reason(name) or "exists only for macOS"))
        else:
            specs.append(spec)
    channels = [
        str(item.get("url", "")) if isinstance(item, dict) else str(item) for item in metadata.get("channels") or []
    ]
    return CondaInput(
        channels=expand_channels([channel for channel in channels if channel]),
        specs=tuple(specs),
        pip_requirements=tuple(pip),
        subdir=platform,
        dropped=tuple(dropped),
    )
