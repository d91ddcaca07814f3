"""Small file helpers the front door and the providers share."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any


def sha256_file(path: Path) -> str:
    with path.open("rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def place_file(source: Path, target: Path) -> None:
    """Atomically put ``source`` at ``target``: a hard link when on the same file system, else a copy."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.tmp")
    tmp.unlink(missing_ok=True)
    try:
        os.link(source, tmp)
    except OSError:
        shutil.copyfile(source, tmp)
    tmp.replace(target)


def private_dir(path: Path) -> Path:
    """``path`` as a directory only its owner can enter (0700), made if missing; an existing one made by an older
    rawvm, or under a loose umask, is tightened too (when it is ours: another user's is left for the OS to refuse)."""
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    info = path.stat()
    if info.st_mode & 0o077 and info.st_uid == os.getuid():
        path.chmod(0o700)
    return path


def state_dir() -> Path:
    """This host's rawvm state: ``$RAWVM_STATE_DIR``, else ``$XDG_STATE_HOME/rawvm`` (``~/.local/state/rawvm``).
    Cluster records, sinks, function and Dask state all live below it, so it is 0700: the tokens, task output and
    flushed logs below it are nobody else's business, whatever the modes below it say."""
    if env := os.environ.get("RAWVM_STATE_DIR"):
        return private_dir(Path(env))
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return private_dir(Path(base) / "rawvm")


def records_dir(cluster: str) -> Path:
    """The laptop-only records of a cluster (batch record, provider note, fetched-flush index), 0700.

    Apart from the sink directory on purpose: flushes come from machines, which may lie, and no unpack ever writes
    here, so what a machine uploads can never become a record this host trusts (a batch's argv or launch options,
    the provider to fetch from)."""
    return private_dir(state_dir() / "records" / cluster)


def write_private_json(path: Path, data: Any) -> None:
    """Write ``data`` as JSON to ``path`` atomically, 0600 (mkstemp's mode) whatever the umask."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}-")
    try:
        with os.fdopen(fd, "w") as handle:
            json.dump(data, handle, indent=2, sort_keys=True)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
