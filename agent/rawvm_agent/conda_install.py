"""Install the conda part of a bundle (``conda-lock.yml``, conda-lock v1) into a prefix with py-rattler.

py-rattler is the optional ``conda`` extra: it is imported only when a bundle has a conda part.
Package integrity: rattler checks the sha256 of every package it downloads over http(s) against the lock,
but not of ``file://`` packages, so those are checked here before anything is linked.
"""

from __future__ import annotations

import atexit
import functools
import hashlib
import threading
import time
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING
from urllib.parse import unquote, urlsplit

from rawvm_agent.install import InstallError

if TYPE_CHECKING:
    from rattler import RepoDataRecord
    from rattler.install import InstallerReporter

Progress = Callable[[int, int], None]
_CHUNK = 1 << 20


class CondaInstallError(InstallError):
    """The conda part could not be installed; one line for the status and the log."""


async def install_conda_lock(
    lock_path: Path,
    prefix: Path,
    *,
    platform: str | None = None,
    progress: Progress | None = None,
    cache_dir: Path | None = None,
) -> None:
    """Install the lock's conda packages for ``platform`` (default: this machine's subdir) into ``prefix``.

    ``progress(done, total)`` counts packages; rattler calls it from its worker threads. ``cache_dir``: where
    packages are downloaded and extracted (default: rattler's cache, ~/.cache/rattler).
    """
    rattler = _import_rattler()
    _settle_at_exit()
    records = _locked_records(rattler, lock_path, platform or str(rattler.Subdir.current()))
    for record in records:
        _verify_local_package(record)
    reporter = _progress_reporter(progress) if progress is not None else None
    try:
        await rattler.install(
            records,
            target_prefix=prefix,
            cache_dir=cache_dir,
            platform=rattler.Subdir(platform) if platform else None,
            execute_link_scripts=False,  # post-link scripts run arbitrary code; conda-forge asks packages to avoid them
            show_progress=False,
            reporter=reporter,
        )
    except Exception as exc:  # rattler's errors share no base class; every one means "not installed"
        raise CondaInstallError(f"conda install into {prefix} failed: {_one_line(exc)}") from None


def _settle_rattler_threads() -> None:
    # A known pyo3-async-runtimes race with no shutdown API yet (PyO3/pyo3-async-runtimes#40).
    # py-rattler's tokio threads drop Python references just after a call returns; if that happens while the
    # interpreter finalizes, CPython aborts the process. atexit runs before finalization: a short pause lets
    # them finish. Measured with a script that installs and exits: 6 of 30 runs aborted without, 0 of 30 with.
    time.sleep(0.1)


@functools.cache
def _settle_at_exit() -> None:
    atexit.register(_settle_rattler_threads)


def _import_rattler() -> ModuleType:
    try:
        import rattler
    except ImportError:
        raise CondaInstallError(
            "the bundle has a conda part but py-rattler is missing: install rawvm-agent[conda]"
        ) from None
    return rattler


def _locked_records(rattler: ModuleType, lock_path: Path, platform: str) -> list[RepoDataRecord]:
    try:
        lock = rattler.LockFile.from_path(lock_path)
    except Exception as exc:  # ParseCondaLockError and friends
        raise CondaInstallError(f"{lock_path.name} is no readable conda lock: {_one_line(exc)}") from None
    environment = lock.default_environment()
    # Platform objects must come from the lock itself (a standalone LockPlatform is rejected by rattler).
    platforms = {p.name: p for p in environment.platforms()} if environment is not None else {}
    if platform not in platforms:
        have = ", ".join(sorted(platforms)) or "none"
        raise CondaInstallError(
            f"{lock_path.name} has no packages for {platform} (it has: {have}); lock for this target"
        )
    return list(environment.conda_repodata_records_for_platform(platforms[platform]) or [])


def _verify_local_package(record: RepoDataRecord) -> None:
    """sha256 (or md5 when the lock has no sha256) of a file:// package against the lock."""
    url = urlsplit(str(record.url))
    if url.scheme != "file":
        return
    path = Path(unquote(url.path))
    expected = record.sha256 or record.md5
    if expected is None:
        raise CondaInstallError(f"{path.name} has no hash in the lock; refusing to install it unverified")
    digest = hashlib.sha256() if record.sha256 else hashlib.md5()  # noqa: S324 - the lock's own md5, not security by itself
    try:
        with path.open("rb") as handle:
            while chunk := handle.read(_CHUNK):
                digest.update(chunk)
    except OSError as exc:
        raise CondaInstallError(f"conda package {path} cannot be read: {exc.strerror}") from None
    if digest.digest() != bytes(expected):
        raise CondaInstallError(f"conda package {path.name} does not match the hash in the lock; nothing installed")


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


def _progress_reporter(progress: Progress) -> InstallerReporter:
    """rattler's InstallerReporter reduced to packages done / total (its other callbacks stay no-ops)."""
    from rattler.install import InstallerReporter

    class _Reporter(InstallerReporter):
        def __init__(self) -> None:
            self._lock = threading.Lock()
            self._done = 0
            self._total = 0

        def on_transaction_start(self, total_operations: int) -> None:
            with self._lock:
                self._total = total_operations
            progress(0, total_operations)

        def on_transaction_operation_complete(self, operation: int) -> None:
            with self._lock:
                self._done += 1
                done, total = self._done, self._total
            progress(done, total)

    # The protocol's other methods have no-op bodies, which mypy reads as abstract.
    return _Reporter()  # type: ignore[abstract]
