"""The project's files for ``code.tar.gz``: git's view (tracked or not ignored) when in a repository, else a walk.

The archive is reproducible: sorted members, mtime 0, uid/gid 0, no user names, gzip header without a time.
"""

from __future__ import annotations

import gzip
import io
import os
import stat
import subprocess
import tarfile
from dataclasses import dataclass
from pathlib import Path

MAX_FILE_BYTES = 10 * 1024 * 1024  # bigger files are data, not code: left out with a warning
MAX_TOTAL_BYTES = 200 * 1024 * 1024
_SKIP_DIRS = {".git", ".hg", ".svn", "__pycache__", "node_modules", ".venv", "venv", ".tox", ".nox", ".rawvm"}
_SKIP_SUFFIXES = (".pyc", ".pyo")


@dataclass(frozen=True)
class ProjectFiles:
    root: Path
    files: tuple[str, ...]  # POSIX paths relative to root, sorted
    skipped: tuple[str, ...]  # too big, with the reason


def list_project_files(root: Path, *, exclude: tuple[Path, ...] = ()) -> ProjectFiles:
    root = root.resolve()
    candidates = _git_files(root)
    if candidates is None:
        candidates = _walk_files(root)
    excluded = [path.resolve() for path in exclude]
    kept: list[str] = []
    skipped: list[str] = []
    total = 0
    for relative in sorted(set(candidates)):
        path = root / relative
        if any(part in _SKIP_DIRS for part in Path(relative).parts[:-1]) or relative.endswith(_SKIP_SUFFIXES):
            continue
        if any(path == ex or ex in path.parents for ex in excluded):
            continue
        try:
            info = path.lstat()
        except OSError:
            continue  # tracked but deleted
        if not stat.S_ISREG(info.st_mode):
            continue
        if info.st_size > MAX_FILE_BYTES:
            skipped.append(
                f"{relative} ({info.st_size // (1024 * 1024)} MiB, over the {MAX_FILE_BYTES // 2**20} MiB cap)"
            )
            continue
        if total + info.st_size > MAX_TOTAL_BYTES:
            skipped.append(f"{relative} (the project is over the {MAX_TOTAL_BYTES // 2**20} MiB cap)")
            continue
        total += info.st_size
        kept.append(relative)
    return ProjectFiles(root=root, files=tuple(kept), skipped=tuple(skipped))


def _git_files(root: Path) -> list[str] | None:
    try:
        completed = subprocess.run(
            ["git", "-C", str(root), "ls-files", "--cached", "--others", "--exclude-standard", "-z"],
            capture_output=True,
            check=False,
        )
    except OSError:
        return None
    if completed.returncode != 0:
        return None  # not a git repository (or no git)
    return [name for name in completed.stdout.decode(errors="surrogateescape").split("\0") if name]


def _walk_files(root: Path) -> list[str]:
    files: list[str] = []
    for directory, subdirs, names in os.walk(root):
        subdirs[:] = sorted(
            d for d in subdirs if d not in _SKIP_DIRS and not (Path(directory, d) / "pyvenv.cfg").exists()
        )
        for name in names:
            files.append(Path(directory, name).relative_to(root).as_posix())
    return files


def code_archive(project: ProjectFiles) -> bytes:
    """A reproducible tar.gz of the project's files."""
    buffer = io.BytesIO()
    with (
        gzip.GzipFile(filename="", mode="wb", fileobj=buffer, mtime=0) as compressed,
        tarfile.open(fileobj=compressed, mode="w", format=tarfile.PAX_FORMAT) as archive,
    ):
        for relative in project.files:
            path = project.root / relative
            try:
                data = path.read_bytes()
            except FileNotFoundError:
                continue  # removed since it was listed (a build's temporary file): there is nothing to send
            member = tarfile.TarInfo(relative)
            member.size = len(data)
            member.mtime = 0
            member.mode = 0o755 if os.access(path, os.X_OK) else 0o644
            member.uid = member.gid = 0
            member.uname = member.gname = ""
            archive.addfile(member, io.BytesIO(data))
    return buffer.getvalue()
