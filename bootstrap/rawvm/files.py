"""Small file helpers the front door and the providers share."""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path


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


def state_dir() -> Path:
    """This host's rawvm state: ``$RAWVM_STATE_DIR``, else ``$XDG_STATE_HOME/rawvm`` (``~/.local/state/rawvm``).
    Cluster records, sinks, function and Dask state all live below it."""
    if env := os.environ.get("RAWVM_STATE_DIR"):
        return Path(env)
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "rawvm"
