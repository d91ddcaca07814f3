"""Bring a cluster's flushes back to this host, in the local provider's sink layout.

Every agent that stops sends one tar.gz whose members lie under ``<label>-<UTC time>/`` (rawvm_agent.sink).
``FlushCache`` unpacks each such archive into ``dest`` with the agent's own checked unpacking
(``rawvm_agent.install.unpack_code``: tarfile's ``data`` filter, or the same rule on Pythons without it), so
``dest`` ends up as the local provider's sink directory looks: ``<label>-<UTC time>/tasks/<id>/stdout``, ...
``dest/.fetched.json`` remembers each archive's source and fingerprint (size and mtime, an S3 ETag): a flush
already fetched is not fetched again.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

from rawvm_agent.install import InstallError, unpack_code

from rawvm.errors import RawvmError

FETCHED = ".fetched.json"  # hidden: the flush globs (``<cluster>-*-*``) never see it


class FlushCache:
    """The flushes of one cluster already brought into ``dest``; ``unpack`` adds one."""

    def __init__(self, dest: Path) -> None:
        self.dest = dest
        self.errors: list[str] = []
        try:
            raw = json.loads((dest / FETCHED).read_text())
        except (OSError, ValueError):
            raw = {}
        self._seen: dict[str, str] = {str(k): str(v) for k, v in raw.items()} if isinstance(raw, dict) else {}

    def has(self, source: str, fingerprint: str) -> bool:
        return self._seen.get(source) == fingerprint

    def unpack(self, source: str, fingerprint: str, archive: Path) -> bool:
        """Unpack ``archive`` (the flush ``source``) into ``dest``; False when it is unsafe or unreadable (the
        reason joins ``errors``, and the other flushes go on)."""
        self.dest.mkdir(parents=True, exist_ok=True)
        scratch = Path(tempfile.mkdtemp(prefix=".fetch-", dir=self.dest))
        try:
            unpack_code(archive, scratch)
            for entry in sorted(scratch.iterdir()):
                target = self.dest / entry.name
                if target.is_dir():  # the same flush, changed since (a re-upload): the new one wins
                    shutil.rmtree(target)
                entry.rename(target)
        except (InstallError, OSError) as exc:
            self.errors.append(f"{source}: {exc}")
            return False
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
        self._seen[source] = fingerprint
        self._save()
        return True

    def _save(self) -> None:
        tmp = self.dest / f"{FETCHED}.tmp"
        tmp.write_text(json.dumps(self._seen, indent=2, sort_keys=True) + "\n")
        os.replace(tmp, self.dest / FETCHED)

    def raise_errors(self) -> None:
        if self.errors:
            raise RawvmError(f"some flushes could not be unpacked: {'; '.join(self.errors)}")
