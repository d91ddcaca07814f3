"""Lock files and projects as inputs: poetry.lock, uv.lock, Pipfile.lock, pdm.lock, pylock.toml, conda-lock.yml.

``read_lock`` turns a file of any of these formats (told by content, see formats) into the Environment a freeze
gives: the locked versions are the pins, each with the marker it installs under; ``select_for_target`` keeps the
pins true on the target. ``read_project`` reads a pyproject.toml, through its lock when one is beside it.
"""

from __future__ import annotations

from pathlib import Path

from rawvm_resolver.environment import Environment
from rawvm_resolver.lockfiles.common import check_not_empty, lock_environment, select_for_target
from rawvm_resolver.lockfiles.declared import read_project as _read_declared_project
from rawvm_resolver.lockfiles.formats import CONDA_LOCK, DIRECTORY_NAMES, FORMATS, PDM, PIPFILE, POETRY, UV, lock_format
from rawvm_resolver.lockfiles.readers import (
    read_pdm_lock,
    read_pipfile_lock,
    read_poetry_lock,
    read_pylock,
    read_uv_lock,
)

__all__ = [
    "DIRECTORY_NAMES",
    "FORMATS",
    "check_not_empty",
    "lock_format",
    "read_lock",
    "read_project",
    "select_for_target",
]

_READERS = {POETRY: read_poetry_lock, UV: read_uv_lock, PDM: read_pdm_lock, PIPFILE: read_pipfile_lock}


def read_lock(path: Path, kind: str) -> Environment:
    """``path`` read as the lock format ``kind`` (one of FORMATS)."""
    if kind == CONDA_LOCK:
        from rawvm_resolver.conda.conda_lock_input import read_conda_lock  # lazy: the conda part is optional
        from rawvm_resolver.sources import conda_environment

        return conda_environment(read_conda_lock(path), origin=str(path))
    reader = _READERS.get(kind, read_pylock)
    return lock_environment(reader(path))


def read_project(path: Path) -> Environment:
    """A pyproject.toml: through the lock beside it when there is one, else from its declared ranges."""
    for name in (UV, POETRY, PDM):
        if path.with_name(name).is_file() and lock_format(path.with_name(name)) == name:
            return read_lock(path.with_name(name), name)
    return _read_declared_project(path)
