"""The lock's wheels, downloaded while the agent's Python still imports (issue 22).

On a fresh machine the install's first seconds are uv downloading the lock's wheels, and uv can start only after
the agent is up (its imports take seconds on a small machine) and after the user-data's uv has arrived. The lock
comes first in the bundle's prefetch (prefetch.py), so its wheels can download then, in threads, while the agent
imports; the installer then hands uv a copy of the *verified* lock whose wheels point at the files that came
(``path`` instead of ``url``), and uv unpacks instead of downloading.

What keeps this safe: a wheel is used only when the sha256 of the downloaded file is the one the verified lock
(checked against the manifest, checked against agent.toml) names for it, and uv checks the same hash again as
it installs a ``path`` wheel. The lock parsed here at first is unverified: it only chooses what to download.

What keeps it from wasting work: only on a first start, only when uv's cache is empty (a machine image or a
host with a warm cache installs from it: a path wheel would bypass it), only packages with exactly one wheel
and no marker (uv would skip one whose marker does not hold here), at most ``WHEEL_BYTES_MAX`` in all. Anything
not prefetched (an error, a slow or missing file) uv downloads itself, as before.
"""

from __future__ import annotations

import copy
import hashlib
import logging
import os
import queue
import re
import ssl
import threading
import time
import tomllib
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["WHEEL_BYTES_MAX", "LockedWheel", "WheelPrefetch", "is_pylock_name", "uv_cache_is_empty", "wheels_to_fetch"]

log = logging.getLogger("rawvm_agent.prefetch")

WHEEL_BYTES_MAX = 1 << 30  # the wheels are kept until the install ends, beside uv's unpacked copy of them
PARALLEL = 4  # downloads at once (uv's default is 50; a few streams fill a small machine's link)
TIMEOUT_S = 30.0  # per connection and per read
WAIT_S = 600.0  # the installer waits this long in all for downloads that began before it; then uv takes over
CHUNK = 1 << 16
_WHEEL_FILE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+!-]*\.whl")
_PYLOCK_NAME = re.compile(r"pylock(\.[^./]+)?\.toml")  # PEP 751's file names, which uv requires too


@dataclass(frozen=True)
class LockedWheel:
    url: str
    sha256: str
    size: int
    filename: str


def is_pylock_name(path: str) -> bool:
    return _PYLOCK_NAME.fullmatch(path.rsplit("/", 1)[-1]) is not None


def uv_cache_is_empty(environ: Mapping[str, str]) -> bool:
    """True when the uv cache the agent's uv will use (``UV_CACHE_DIR``, else ``$XDG_CACHE_HOME/uv``, else
    ``~/.cache/uv``, as uv chooses) is missing or empty: nothing in it that a prefetched wheel would bypass."""
    if directory := environ.get("UV_CACHE_DIR"):
        cache = Path(directory)
    elif xdg := environ.get("XDG_CACHE_HOME"):
        cache = Path(xdg) / "uv"
    else:
        cache = Path(environ.get("HOME") or Path.home()) / ".cache" / "uv"
    try:
        return not any(cache.iterdir())
    except FileNotFoundError:
        return True
    except OSError:
        return False


def wheels_to_fetch(lock: Mapping[str, Any], budget: int = WHEEL_BYTES_MAX) -> list[LockedWheel]:
    """The lock's wheels worth fetching ahead: a package with one wheel, no marker, an https URL naming a
    ``.whl`` file, a sha256 and a size; the largest first (they take longest), up to ``budget`` bytes."""
    found: list[LockedWheel] = []
    for package in lock.get("packages", []):
        wheels = package.get("wheels") if isinstance(package, dict) else None
        if not isinstance(wheels, list) or len(wheels) != 1 or "marker" in package:
            continue
        wheel = wheels[0]
        url, size = wheel.get("url"), wheel.get("size")
        sha256 = (wheel.get("hashes") or {}).get("sha256")
        if not (isinstance(url, str) and url.startswith("https://") and isinstance(sha256, str)):
            continue
        filename = url.rsplit("/", 1)[-1].split("?", 1)[0]
        if isinstance(size, int) and size > 0 and _WHEEL_FILE.fullmatch(filename):
            found.append(LockedWheel(url, sha256.lower(), size, filename))
    found.sort(key=lambda wheel: wheel.size, reverse=True)
    chosen: list[LockedWheel] = []
    for wheel in found:
        if wheel.size <= budget and wheel.filename not in {w.filename for w in chosen}:
            chosen.append(wheel)
            budget -= wheel.size
    return chosen


class WheelPrefetch:
    """``start`` with the (unverified) lock's text; ``local_lock`` writes the verified lock with the wheels that
    came as paths."""

    def __init__(self, into: Path, context: ssl.SSLContext) -> None:
        self.dir = into
        self.context = context
        self._queue: queue.SimpleQueue[LockedWheel | None] = queue.SimpleQueue()
        self._threads: list[threading.Thread] = []
        self._done: dict[str, Path] = {}  # sha256 of a complete file -> the file

    def start(self, lock_text: str) -> int:
        """Downloads begun (threads); 0 when the lock names nothing to fetch or does not parse."""
        try:
            wanted = wheels_to_fetch(tomllib.loads(lock_text))
        except (tomllib.TOMLDecodeError, AttributeError, TypeError):
            return 0
        if not wanted:
            return 0
        self.dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        for wheel in wanted:
            self._queue.put(wheel)
        for _ in range(min(PARALLEL, len(wanted))):
            self._queue.put(None)  # one stop per worker, after the work
            thread = threading.Thread(target=self._work, name="prefetch-wheels", daemon=True)
            self._threads.append(thread)
            thread.start()
        return len(wanted)

    def _work(self) -> None:
        while (wheel := self._queue.get()) is not None:
            self._download(wheel)

    def _download(self, wheel: LockedWheel) -> None:
        dest = self.dir / wheel.filename
        partial = dest.with_name(dest.name + ".part")
        try:
            digest = hashlib.sha256()
            # https only (wheels_to_fetch): no file:// or other scheme is opened.
            response = urllib.request.urlopen(wheel.url, timeout=TIMEOUT_S, context=self.context)  # noqa: S310
            with response, partial.open("wb") as out:
                while chunk := response.read(CHUNK):
                    out.write(chunk)
                    digest.update(chunk)
            if digest.hexdigest() != wheel.sha256:
                raise ValueError(f"sha256 {digest.hexdigest()[:16]}…, the lock says {wheel.sha256[:16]}…")
            os.replace(partial, dest)
            self._done[wheel.sha256] = dest
        except Exception as exc:  # whatever went wrong, uv downloads this wheel itself and says why if it fails too
            log.debug("wheel prefetch: %s: %r; uv fetches it", wheel.filename, exc)
        finally:
            partial.unlink(missing_ok=True)

    def local_lock(self, verified: Path, out: Path, wait_s: float = WAIT_S) -> int:
        """Write ``out``: the ``verified`` lock with each wheel that came whole with the sha256 *it* names given
        as a ``path`` instead of its ``url``; the number of wheels given so (0: ``out`` is not written, install
        from ``verified``). Waits for the downloads still running, up to ``wait_s`` in all."""
        deadline = time.monotonic() + wait_s
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        done = dict(self._done)  # a download still running past the wait is not used
        text = verified.read_text(encoding="utf-8")
        try:
            lock = tomllib.loads(text)
        except tomllib.TOMLDecodeError:
            return 0
        swapped: dict[str, str] = {}  # url -> path
        for package in lock.get("packages", []):
            wheels = package.get("wheels") if isinstance(package, dict) else None
            if not isinstance(wheels, list) or len(wheels) != 1:
                continue
            url, sha256 = wheels[0].get("url"), (wheels[0].get("hashes") or {}).get("sha256")
            came = done.get(sha256.lower()) if isinstance(sha256, str) else None
            if isinstance(url, str) and came is not None and text.count(f'url = "{url}"') == 1:
                swapped[url] = str(came)
        if not swapped or any('"' in path or "\\" in path for path in swapped.values()):
            return 0
        for url, path in swapped.items():
            text = text.replace(f'url = "{url}"', f'path = "{path}"')
        if not _only_swapped(lock, tomllib.loads(text), swapped):
            return 0
        out.write_text(text, encoding="utf-8")
        return len(swapped)


def _only_swapped(before: dict[str, Any], after: dict[str, Any], swapped: dict[str, str]) -> bool:
    """The rewritten lock is the verified one with those urls, and only those, turned into those paths."""
    expected = copy.deepcopy(before)
    for package in expected.get("packages", []):
        for wheel in package.get("wheels", []) if isinstance(package, dict) else []:
            if isinstance(wheel, dict) and wheel.get("url") in swapped:
                wheel["path"] = swapped[wheel.pop("url")]
    return expected == after
