"""The environment's fingerprint on a warm run, without scanning the environment again when nothing it was read
from has changed.

``rawvm run --cluster`` asks, before every task, whether the environment changed since the machines' bundle was
locked: it compares ``scan(source).fingerprint()`` with the machines' (``rawvm.code_sync``). The scan (and the
resolver modules it needs) takes 50-100 ms; on an unchanged environment that is wasted on every run. So the
fingerprint is kept (``fingerprints.json`` in the state directory) together with a **stamp** of everything the scan
read: every path it opened (found or not), every directory it listed, the parent directory of each (a file added
next to them changes it), the source itself and its directory, and every local path the scanned environment
names as a distribution's source (an ``-e ./pkg``: a ``pyproject.toml`` added there renames the project). A stamp
is each path's ``(st_ino, st_size, st_mtime_ns, st_ctime_ns)``, or absence. While every stamped path stats the
same, the scan would read the same bytes, so its fingerprint is the kept one; any difference scans again.

What was read is seen through Python's audit events (``open``, ``os.listdir``, ``os.scandir``, ``glob.glob``),
recorded for the scanning thread only. A scan that starts a process or opens a socket could have read what no
event shows: its fingerprint is not kept (an interpreter source, a conda helper). Neither is one whose inputs
changed less than ``FRESH_S`` before the scan began (a file written within the file system's timestamp tick
could change again without its stamp changing: git's "racily clean" case); the next run keeps it.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rawvm.files import state_dir, write_private_json

__all__ = ["FRESH_S", "Reads", "environment_fingerprint", "fingerprint_key", "recording_reads"]

FRESH_S = 2.0  # an input changed this recently is not trusted to stat differently after its next change
MAX_ENTRIES = 64  # sources remembered; the oldest go first
_CACHE_NAME = "fingerprints.json"
_READ_EVENTS = frozenset({"open", "os.listdir", "os.scandir", "glob.glob"})
_BLIND_EVENTS = frozenset(
    {
        "subprocess.Popen",
        "os.system",
        "os.posix_spawn",
        "os.exec",
        "os.fork",
        "os.forkpty",
        "socket.connect",
        "socket.getaddrinfo",
        "urllib.Request",
    }
)


@dataclass
class Reads:
    """What one thread read while recorded: paths, and whether it did something no audit event describes."""

    paths: set[str] = field(default_factory=set)
    blind: str = ""  # the first event that made the record incomplete ("subprocess.Popen"), "" if none


_local = threading.local()
_hook_lock = threading.Lock()
_hooked = False


def _audit(event: str, args: tuple[Any, ...]) -> None:
    """The process's audit hook: records in a recording thread, nothing elsewhere. It never raises (an exception
    here would fail the audited call): a path it cannot make sense of makes the record blind instead."""
    reads: Reads | None = getattr(_local, "reads", None)
    if reads is None:
        return
    try:
        if event in _READ_EVENTS:
            target = args[0] if args else None
            if isinstance(target, int):  # a file descriptor: opened by path before, or not a file at all
                return
            reads.paths.add(os.path.abspath(os.fsdecode(target if target is not None else ".")))
        elif event in _BLIND_EVENTS and not reads.blind:
            reads.blind = event
    except Exception as exc:
        reads.blind = reads.blind or f"{event}: {exc}"


@contextlib.contextmanager
def recording_reads() -> Iterator[Reads]:
    """Record the paths this thread opens or lists until the block ends. The audit hook is added to the process
    once, on first use, and does nothing outside a recording thread (a thread-local read per event)."""
    global _hooked
    with _hook_lock:
        if not _hooked:
            sys.addaudithook(_audit)
            _hooked = True
    reads = Reads()
    outer = getattr(_local, "reads", None)
    _local.reads = reads
    try:
        yield reads
    finally:
        _local.reads = outer


def fingerprint_key(source: str | Path | None) -> str:
    """Which environment a kept fingerprint belongs to: the source's absolute path, or the running interpreter."""
    if source is None:
        return f"running:{sys.executable}:{sys.version}"
    return str(Path(source).expanduser().resolve())


def _stat(path: str) -> list[int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return [st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns]


def _stamp(paths: set[str]) -> dict[str, list[int] | None]:
    return {path: _stat(path) for path in sorted(paths)}


def _local_sources(environment: Any) -> set[str]:
    """The local paths an environment's distributions come from (``file://`` URLs of editables, directories,
    archives)."""
    from urllib.parse import unquote, urlparse

    found = set()
    for dist in getattr(environment, "distributions", ()):
        url = str(getattr(dist.source, "url", "") or "").partition("#")[0]
        if url.startswith("file:"):
            found.add(os.path.abspath(unquote(urlparse(url).path)))
    return found


def _watched(reads: Reads, key_path: str | None, environment: Any) -> set[str]:
    paths = set(reads.paths) | _local_sources(environment)
    if key_path is not None:
        paths.add(key_path)
    return paths | {os.path.dirname(path) for path in paths}


def _cache_path() -> Path:
    return state_dir() / _CACHE_NAME


def _load() -> dict[str, Any]:
    try:
        data = json.loads(_cache_path().read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _kept(entry: Any) -> str | None:
    """The entry's fingerprint when every path it stamped still stats the same; None otherwise."""
    if not isinstance(entry, dict) or not isinstance(entry.get("stamp"), dict) or not entry.get("fingerprint"):
        return None
    for path, was in entry["stamp"].items():
        if _stat(path) != was:
            return None
    return str(entry["fingerprint"])


def _keep(key: str, fingerprint: str, stamp: dict[str, list[int] | None]) -> None:
    with contextlib.suppress(OSError):
        entries = _load()
        entries.pop(key, None)
        entries[key] = {"fingerprint": fingerprint, "stamp": stamp, "at": time.time()}
        while len(entries) > MAX_ENTRIES:
            entries.pop(
                min(entries, key=lambda k: float(entries[k].get("at", 0)) if isinstance(entries[k], dict) else 0)
            )
        write_private_json(_cache_path(), entries)


def environment_fingerprint(
    source: str | Path | None, *, scan: Callable[[str | Path | None], Any] | None = None
) -> str:
    """``scan(source).fingerprint()``, from the kept one when nothing the last scan read has changed since.
    ``scan`` defaults to ``rawvm_resolver.scan.scan`` (tests pass their own)."""
    key = fingerprint_key(source)
    kept = _kept(_load().get(key))
    if kept is not None:
        return kept
    if scan is None:
        from rawvm_resolver.scan import scan as resolver_scan

        scan = resolver_scan
    began = time.time()
    with recording_reads() as reads:
        environment = scan(source)
    fingerprint = str(environment.fingerprint())
    if not reads.blind:
        stamp = _stamp(_watched(reads, None if source is None else key, environment))
        newest = max((max(s[2], s[3]) for s in stamp.values() if s is not None), default=0)
        if newest / 1e9 < began - FRESH_S:
            _keep(key, fingerprint, stamp)
    return fingerprint
