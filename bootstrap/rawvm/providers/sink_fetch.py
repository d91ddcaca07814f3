"""Bring a cluster's flushes back to this host, in the local provider's sink layout, treating them as untrusted.

Every agent that stops sends one tar.gz whose members lie under ``<cluster>-<label>-<UTC time>/``
(rawvm_agent.sink). A flush is data a machine made, and a machine (or whoever stole its upload form) may lie, so
``FlushCache.unpack`` accepts an archive only when:

- every member lies under ONE top-level directory, whose name is the flush's own name (the provider says which
  names a source may use: an S3 key's file name, a qemu machine's id), so one flush can neither add files beside
  the flushes nor take another machine's name;
- it holds regular files and directories only, at most ``MAX_FLUSH_MEMBERS`` of them and ``MAX_FLUSH_BYTES``
  unpacked in all (the sizes the tar headers declare, checked before anything is decompressed past them: a
  decompression bomb is refused after reading its first header, and nothing of it is kept);
- then the agent's own checked unpacking runs (``rawvm_agent.install.unpack_code``: tarfile's ``data`` filter).

What it keeps is 0600 files in 0700 directories, whatever the archive says. It is unpacked into ``dest`` (the
sink directory, ``<state>/sinks/<cluster>/``), where nothing but flushes lives: the laptop's own records are in
``files.records_dir(cluster)``, which no unpack writes into. There ``fetched.json`` remembers each archive's
source, fingerprint (size and mtime, an S3 ETag) and the flush it became: a flush still there is not fetched again.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tarfile
import tempfile
from pathlib import Path, PurePosixPath

from rawvm_agent.install import InstallError, unpack_code

from rawvm.errors import RawvmError
from rawvm.files import records_dir, write_private_json

FETCHED = "fetched.json"
MAX_FLUSH_BYTES = 4 * 1024**3  # unpacked, per flush: far above a machine's logs and telemetry ring
MAX_FLUSH_MEMBERS = 100_000
_UTC = r"\d{8}T\d{6}Z"  # rawvm_agent.sink._bundle_name's time stamp
_LABEL = r"[A-Za-z0-9._-]+"


class FlushRefused(Exception):
    """A flush that is unsafe or unreadable; its message is one line that names what was wrong."""


def machine_flush_pattern(cluster: str, machine: str) -> str:
    """The names the flushes of ``machine`` (a machine id that names the upload, as on qemu) may take."""
    return re.escape(f"{cluster}-{machine}-") + _UTC


def named_flush_pattern(cluster: str, file_name: str) -> str | None:
    """The one name a flush uploaded as ``<cluster>-<label>-<UTC>.tar.gz`` may take (an S3 key's file name); None
    when the file name is not one a flush of ``cluster`` has."""
    stem = file_name.removesuffix(".tar.gz")
    if not re.fullmatch(re.escape(f"{cluster}-") + _LABEL + "-" + _UTC, stem):
        return None
    return re.escape(stem)


def checked_top(archive: Path, pattern: str) -> str:
    """The archive's one top-level directory, after checking every member's name, type and size (see above)."""
    top = ""
    total = count = 0
    try:
        with tarfile.open(archive, "r:gz") as tar:
            # next() one by one, not getmembers(): a member's declared size is checked before its data is skipped
            # (skipping decompresses it), so a bomb costs one header.
            while (member := tar.next()) is not None:
                count, total = count + 1, total + max(member.size, 0)
                if count > MAX_FLUSH_MEMBERS or total > MAX_FLUSH_BYTES:
                    raise FlushRefused(
                        f"larger than {MAX_FLUSH_BYTES >> 20} MiB or {MAX_FLUSH_MEMBERS} files unpacked: refused"
                    )
                name = PurePosixPath(member.name)
                if name.is_absolute() or ".." in name.parts or not name.parts:
                    raise FlushRefused(f"member {member.name!r} points outside its flush directory")
                if not (member.isfile() or member.isdir()) or (len(name.parts) == 1 and not member.isdir()):
                    raise FlushRefused(f"member {member.name!r} is not a file inside the flush directory")
                if not top and not re.fullmatch(pattern, name.parts[0]):
                    raise FlushRefused(f"flush directory {name.parts[0]!r} is not this flush's own name")
                if top and name.parts[0] != top:
                    raise FlushRefused(f"member {member.name!r} lies outside the flush directory {top!r}")
                top = name.parts[0]
    except (tarfile.TarError, OSError, EOFError) as exc:
        raise FlushRefused(f"cannot read it: {exc}") from None
    if not top:
        raise FlushRefused("it is empty")
    return top


def private_modes(root: Path) -> None:
    """0700 directories and 0600 files under ``root``: a flush's modes are the machine's, not this host's."""
    root.chmod(0o700)
    for directory, dirs, files in os.walk(root):
        for name in dirs:
            (Path(directory) / name).chmod(0o700)
        for name in files:
            (Path(directory) / name).chmod(0o600)


class FlushCache:
    """The flushes of one cluster already brought into ``dest``; ``unpack`` adds one."""

    def __init__(self, cluster: str, dest: Path) -> None:
        self.dest = dest
        self.index = records_dir(cluster) / FETCHED
        self.errors: list[str] = []
        try:
            raw = json.loads(self.index.read_text())
        except (OSError, ValueError):
            raw = {}
        self._seen: dict[str, dict[str, str]] = {}
        for source, entry in raw.items() if isinstance(raw, dict) else ():
            if isinstance(entry, dict):
                self._seen[str(source)] = {"fingerprint": str(entry.get("fingerprint")), "name": str(entry.get("name"))}

    def has(self, source: str, fingerprint: str) -> bool:
        """True when ``source`` was unpacked with this fingerprint and its flush is still here."""
        entry = self._seen.get(source)
        return entry is not None and entry["fingerprint"] == fingerprint and (self.dest / entry["name"]).is_dir()

    def too_big(self, source: str, size: int) -> bool:
        """True (and said once) when the archive alone is over the cap: it is not even downloaded."""
        if size <= MAX_FLUSH_BYTES:
            return False
        self.errors.append(f"{source}: a {size >> 20} MiB archive, larger than {MAX_FLUSH_BYTES >> 20} MiB: refused")
        return True

    def unpack(self, source: str, fingerprint: str, archive: Path, pattern: str) -> bool:
        """Unpack ``archive`` (the flush ``source``, whose directory must be named as ``pattern`` says) into
        ``dest``; False when it is refused (one line naming it joins ``errors``, and the other flushes go on)."""
        try:
            top = checked_top(archive, pattern)
            owner = next((s for s, e in self._seen.items() if e["name"] == top and s != source), None)
            if owner is not None and (self.dest / top).exists():
                raise FlushRefused(f"its name {top!r} is already taken by {owner}")
            self._place(archive, top)
        except FlushRefused as exc:
            self.errors.append(f"{source}: {exc}")
            return False
        self._seen[source] = {"fingerprint": fingerprint, "name": top}
        write_private_json(self.index, self._seen)
        return True

    def _place(self, archive: Path, top: str) -> None:
        self.dest.mkdir(parents=True, exist_ok=True, mode=0o700)
        scratch = Path(tempfile.mkdtemp(prefix=".fetch-", dir=self.dest))  # 0700
        try:
            unpack_code(archive, scratch)
            private_modes(scratch / top)
            target = self.dest / top
            if target.is_dir():  # the same flush, changed since (a re-upload): the new one wins
                shutil.rmtree(target)
            (scratch / top).rename(target)
        except (InstallError, OSError) as exc:
            raise FlushRefused(str(exc)) from None
        finally:
            shutil.rmtree(scratch, ignore_errors=True)

    def raise_errors(self) -> None:
        if self.errors:
            raise RawvmError(f"some flushes could not be unpacked: {'; '.join(self.errors)}")
