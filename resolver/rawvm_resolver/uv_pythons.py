"""Whether uv has an interpreter of each target Python, so a network that cannot download one pays for that once.

``uv pip compile --python-version X.Y`` looks for an X.Y interpreter (to build source distributions with); when
none is installed it downloads a managed one, from GitHub. Where GitHub is out of reach (a corporate network, this
project's CI machines, which reach only PyPI) uv retries for ~9 s before it falls back to the interpreter it has —
on every run: a lock that relaxes inconsistent pins runs uv up to 24 times, and the real-environment corpus lost
about a third of its time this way. Where the download works, the first run keeps it (uv caches it) and nothing
changes. So after uv's first run for a Python we ask uv, locally (``uv python find``), whether it now has one; if
not, its later runs in this process are told not to try again (``UV_PYTHON_DOWNLOADS=never``: uv then builds
with the interpreter it has, as it did after the failed download). A user's own ``UV_PYTHON_DOWNLOADS`` wins.
"""

from __future__ import annotations

import os
import subprocess
import threading
from collections.abc import Callable

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

    def note_run(self, python: str, uv_bin: Callable[[], str]) -> None:
        """After a uv run for ``python``: the first time, find out whether uv has an interpreter of it now."""
        if "UV_PYTHON_DOWNLOADS" in os.environ:
            return
        with self._lock:
            if python in self._checked:
                return
            self._checked.add(python)
        try:
            found = subprocess.run(
                [uv_bin(), "python", "find", python],
                capture_output=True,
                env={**os.environ, "UV_PYTHON_DOWNLOADS": "never"},
                check=False,
                timeout=30,
            )
        except (OSError, subprocess.TimeoutExpired):
            return  # unknown: later runs behave as uv would by itself
        if found.returncode != 0:
            with self._lock:
                self._unavailable.add(python)


UV_PYTHONS = UvPythons()  # the process's own: every lock in it (a pool's threads too) shares what was learned
