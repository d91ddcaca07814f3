"""What a synced project directory holds, the same way on the laptop and on the machine (``rawvm notebook``).

Both sides list the tree with ``scan``: every regular file under the root by relative POSIX path, with its size,
mtime and sha256, leaving out what is not the project's (version control, caches, virtual environments, Jupyter's
checkpoints, half-received copies) and files over ``MAX_FILE_BYTES``. A ``HashCache`` keeps each file's digest
while its size and mtime stay the same, so listing a tree every second reads only the files that changed.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

__all__ = ["MAX_FILE_BYTES", "SKIP_DIRS", "Entry", "HashCache", "is_skipped_name", "safe_relative", "scan"]

SKIP_DIRS = frozenset(
    {
        ".git",
        ".hg",
        ".svn",
        "__pycache__",
        ".ipynb_checkpoints",
        ".virtual_documents",
        ".venv",
        "venv",
        "node_modules",
        ".mypy_cache",
        ".pytest_cache",
        ".ruff_cache",
        ".tox",
    }
)
MAX_FILE_BYTES = 64 << 20  # larger files are data, not edits: 'rawvm cp' moves them on purpose
MAX_FILES = 20_000  # a listing stops here: a work dir this full is not a notebook project


@dataclass(frozen=True)
class Entry:
    """One file of the tree as the other side needs it."""

    size: int
    mtime_ns: int
    sha256: str


def is_skipped_name(name: str) -> bool:
    """A file name that is never synced: compiled Python, editors' swap files, a copy being received."""
    return (
        name.endswith((".pyc", ".swp", "~"))
        or ".rawvm-partial-" in name
        or name.startswith(".~")
        or name == ".DS_Store"
    )


def _is_venv(path: Path) -> bool:
    return (path / "pyvenv.cfg").is_file() or (path / "conda-meta").is_dir()


class HashCache:
    """sha256 of each file, recomputed only when its (size, mtime) changes."""

    def __init__(self) -> None:
        self._known: dict[Path, Entry] = {}

    def entry(self, path: Path) -> Entry | None:
        """The file's entry, or None when it vanished, is not a regular file or is too large to sync."""
        try:
            stat = path.stat()
        except OSError:
            return None
        if not path.is_file() or stat.st_size > MAX_FILE_BYTES:
            return None
        known = self._known.get(path)
        if known is not None and known.size == stat.st_size and known.mtime_ns == stat.st_mtime_ns:
            return known
        digest = hashlib.sha256()
        try:
            with path.open("rb") as handle:
                while chunk := handle.read(1 << 20):
                    digest.update(chunk)
        except OSError:
            return None
        made = Entry(stat.st_size, stat.st_mtime_ns, digest.hexdigest())
        self._known[path] = made
        return made


def scan(root: Path, cache: HashCache) -> dict[str, Entry]:
    """Every synced file under ``root`` by relative POSIX path (empty when ``root`` is not a directory)."""
    found: dict[str, Entry] = {}
    for top, dirs, files in os.walk(root):
        here = Path(top)
        dirs[:] = sorted(d for d in dirs if d not in SKIP_DIRS and not _is_venv(here / d))
        for name in sorted(files):
            if is_skipped_name(name):
                continue
            entry = cache.entry(here / name)
            if entry is not None:
                found[(here / name).relative_to(root).as_posix()] = entry
                if len(found) >= MAX_FILES:
                    return found
    return found


def safe_relative(root: Path, rel: str) -> Path | None:
    """``root / rel`` for a relative path that stays inside ``root`` and names nothing skipped; None otherwise (a
    damaged or hostile peer names no file outside the synced tree)."""
    pure = PurePosixPath(rel)
    parts = pure.parts
    if not rel or "\0" in rel or pure.is_absolute() or any(p in ("..", ".", "") for p in parts):
        return None
    if any(p in SKIP_DIRS for p in parts[:-1]) or is_skipped_name(parts[-1]):
        return None
    return root.joinpath(*parts)
