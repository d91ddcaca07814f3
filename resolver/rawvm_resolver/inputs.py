"""Which reader a file input goes to: a lock (by content), a pyproject.toml project, else sources' readers.

It sits above both ``lockfiles`` (which reuse sources' requirement parsing) and ``sources`` so neither imports
the other's dispatch.
"""

from __future__ import annotations

from pathlib import Path

from rawvm_resolver.environment import Environment
from rawvm_resolver.lockfiles import DIRECTORY_NAMES, lock_format, read_lock, read_project
from rawvm_resolver.sources import read_file_input

__all__ = ["DIRECTORY_NAMES", "find_in_directory", "read_input"]


def read_input(path: Path) -> Environment:
    if path.is_file():
        kind = lock_format(path)
        if kind is not None:
            return read_lock(path, kind)
        if path.name == "pyproject.toml":
            return read_project(path)
    return read_file_input(path)


def find_in_directory(directory: Path) -> Path | None:
    """The input a project directory holds: a lock first, then pyproject.toml, environment.yml, requirements.txt."""
    for name in (*DIRECTORY_NAMES, "pyproject.toml", "environment.yml", "environment.yaml", "requirements.txt"):
        if (directory / name).is_file():
            return directory / name
    for pattern in ("pylock.*.toml",):
        found = sorted(directory.glob(pattern))
        if found:
            return found[0]
    return None
