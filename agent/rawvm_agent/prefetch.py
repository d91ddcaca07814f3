"""The bundle's files, downloaded while the agent's Python is still importing (issue 22).

On a small machine the agent's imports take seconds (aiohttp's alone ~1.8 s under TCG) and its install begins
only after them. So on the agent's first start ``__main__`` starts this before those imports: a thread per
http(s) bundle file named in agent.toml (stdlib ``urllib``: nothing heavy to import first) downloads it into
``state_dir/bundle.prefetch/``, hashing as it goes. The installer then takes a prefetched file instead of
downloading it, only when its sha256 is the one the installer wants (the manifest's); a file the prefetch did
not get (an error, a wrong hash, a file:// URL) the installer downloads as before, with its retries and its
messages. Nothing here is trusted or reported: at worst it wasted one download.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import ssl
import threading
import urllib.request
from collections.abc import Sequence
from pathlib import Path

from rawvm_agent.config import AgentConfig
from rawvm_agent.install import BundleError, safe_relpath

__all__ = ["PREFETCH_DIR", "BundlePrefetch"]

PREFETCH_DIR = "bundle.prefetch"
MAX_FILES = 8  # a thread each; the installer downloads the others (a bundle has a handful: lock, code, wheels)
TIMEOUT_S = 30.0  # per connection and per read
CHUNK = 1 << 16


class BundlePrefetch:
    """``start`` the downloads; ``take`` a finished one for the installer; ``discard`` what is left."""

    def __init__(self, config: AgentConfig) -> None:
        self.config = config
        self.dir = Path(config.state_dir) / PREFETCH_DIR
        self._threads: dict[str, threading.Thread] = {}
        self._done: dict[str, str] = {}  # bundle path -> sha256 of the complete file under self.dir

    @classmethod
    def for_first_start(cls, config: AgentConfig) -> BundlePrefetch | None:
        """Started, when this is the agent's first start on the machine (no state file yet) and its bundle has
        http(s) files; else None (a restarted agent has its environment, or knows why it has none)."""
        state_dir = Path(config.state_dir)
        if (state_dir / "state.json").exists() or not any(_is_http(f.url) for f in config.bundle.files):
            return None
        prefetch = cls(config)
        try:
            prefetch.start()
        except (OSError, RuntimeError, BundleError):  # no state dir, no threads, a bad path: the installer copes
            return None
        return prefetch

    def start(self) -> None:
        Path(self.config.state_dir).mkdir(mode=0o700, parents=True, exist_ok=True)  # root only, as the agent's
        shutil.rmtree(self.dir, ignore_errors=True)
        self.dir.mkdir(mode=0o700)
        files = [f for f in self.config.bundle.files if _is_http(f.url)][:MAX_FILES]
        relatives = [safe_relpath(f.path) for f in files]  # every path checked before any download starts
        context = _ssl_context(self.config.install.ca_certs) if any(f.url.startswith("https") for f in files) else None
        for entry, relative in zip(files, relatives, strict=True):
            thread = threading.Thread(
                target=self._download, args=(entry.url, relative, context), name="prefetch", daemon=True
            )
            self._threads[entry.path] = thread
            thread.start()

    def _download(self, url: str, relative: str, context: ssl.SSLContext | None) -> None:
        dest = self.dir / relative
        partial = dest.with_name(dest.name + ".part")
        try:
            dest.parent.mkdir(parents=True, exist_ok=True)
            digest = hashlib.sha256()
            # Only http(s) URLs come here (start); no file:// or other scheme is opened.
            response = urllib.request.urlopen(url, timeout=TIMEOUT_S, context=context)  # noqa: S310
            with response, partial.open("wb") as out:
                while chunk := response.read(CHUNK):
                    out.write(chunk)
                    digest.update(chunk)
            os.replace(partial, dest)
            self._done[relative] = digest.hexdigest()
        except Exception:  # whatever went wrong, the installer downloads this file itself and says why
            partial.unlink(missing_ok=True)

    def take(self, path: str, sha256: str, dest: Path, wait_s: float = 120.0) -> bool:
        """Move the prefetched ``path`` to ``dest`` when it came complete with this ``sha256``, after waiting for
        its download (it began seconds before the installer's); False: the caller downloads it."""
        thread = self._threads.get(path)
        if thread is None:
            return False
        thread.join(wait_s)
        relative = safe_relpath(path)
        if self._done.get(relative) != sha256.lower():
            return False
        try:
            os.replace(self.dir / relative, dest)
        except OSError:
            return False
        return True

    def discard(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)


def _is_http(url: str) -> bool:
    return url.startswith(("http://", "https://"))


def _ssl_context(ca_certs: Sequence[str]) -> ssl.SSLContext:
    """The system roots plus ``[install] ca_certs``, as the installer's own downloads trust (fetch.ssl_context)."""
    context = ssl.create_default_context()
    for pem in ca_certs:
        context.load_verify_locations(cafile=pem)
    return context
