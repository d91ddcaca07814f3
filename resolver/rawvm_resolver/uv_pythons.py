"""Whether uv has an interpreter of each target Python, so a network that cannot download one pays for that once.

``uv pip compile --python-version X.Y`` looks for an X.Y interpreter (to build source distributions with); when
none is installed it downloads a managed one, from GitHub. Where GitHub is out of reach (a corporate network, this
project's CI machines, which reach only PyPI) uv retries for ~9 s before it falls back to the interpreter it has —
on every run: a lock that relaxes inconsistent pins runs uv up to 24 times, and the real-environment corpus lost
about a third of its time this way. Where the download works, the first run keeps it (uv caches it) and nothing
changes. So beside uv's first run for a Python we ask uv, locally (``uv python find``), whether it has one; if
not, its later runs in this process are told not to try again (``UV_PYTHON_DOWNLOADS=never``: uv then builds
with the interpreter it has, as it did after the failed download). A user's own ``UV_PYTHON_DOWNLOADS`` wins.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import threading
from collections.abc import Callable, Iterator

__all__ = ["UV_PYTHONS", "UvPythons"]


class UvPythons:
    """What this process learned about uv's interpreters, by target Python (X.Y); safe to share between threads."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._checked: set[str] = set()  # target Pythons asked about after uv's first run for them
        self._unavailable: set[str] = set()  # those uv had no interpreter of even then (its download failed)

    def env(self, python: str) -> dict[str, str]:
        """The environment for a uv run that targets ``python`` (and whose messages rawvm reads)."""
        env = dict(os.environ)
        env.setdefault("UV_NO_PROGRESS", "1")
        # uv wraps its messages at $COLUMNS (a build's error line split over four): rawvm reads them line by line
        env.pop("COLUMNS", None)
        with self._lock:
            unavailable = python in self._unavailable
        if unavailable:
            env.setdefault("UV_PYTHON_DOWNLOADS", "never")
        return env

    @contextlib.contextmanager
    def run_for(self, python: str, uv_bin: Callable[[], str]) -> Iterator[None]:
        """Around a uv run for ``python``: the first time, ask uv beside it whether it had an interpreter of it.

        The question runs while uv resolves (no added wait). Asked during the first run, "no" means that run tried
        the download; later runs then do not try again, and still use the interpreter if the download worked
        (``never`` forbids downloads, not a managed Python uv already has)."""
        probe = self._probe(python, uv_bin)
        try:
            yield
        finally:
            if probe is not None:
                self._settle(python, probe)

    def _probe(self, python: str, uv_bin: Callable[[], str]) -> subprocess.Popen[bytes] | None:
        if "UV_PYTHON_DOWNLOADS" in os.environ:
            return None
        with self._lock:
            if python in self._checked:
                return None
            self._checked.add(python)
        try:
            return subprocess.Popen(
                [uv_bin(), "python", "find", python],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                env={**os.environ, "UV_PYTHON_DOWNLOADS": "never"},
            )
        except OSError:
            return None  # unknown: later runs behave as uv would by itself

    def _settle(self, python: str, probe: subprocess.Popen[bytes]) -> None:
        try:
            code = probe.wait(timeout=30)
        except subprocess.TimeoutExpired:
            probe.kill()
            probe.wait()
            return
        if code != 0:
            with self._lock:
                self._unavailable.add(python)


UV_PYTHONS = UvPythons()  # the process's own: every lock in it (a pool's threads too) shares what was learned
