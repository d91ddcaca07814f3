"""The machine's way to its first task, phase by phase: when each step first happened, in wall-clock seconds.

Users' first complaint about tools like this one is start-up time, and "slow" is useless without "where". The
bootstrap script (user-data, before the agent exists) appends ``NAME EPOCH`` lines to ``boot-phases`` in the state
directory; the agent appends its own to the same file. Appending is crash-safe and needs no lock between a shell
script and a Python process; the first line for a name wins, so a restarted agent keeps the first boot's times.

Phases, in order (a provider that has no bootstrap script, such as local, starts at ``agent_up``):

- ``kernel_boot``: when the kernel started (``btime`` in /proc/stat; whole seconds)
- ``bootstrap_start``: the user-data script began (cloud-init's ``runcmd``/script stage)
- ``agent_venv_ready``: the agent's venv holds the agent and its hashed dependencies
- ``agent_up``: the agent process started
- ``bundle_downloaded``: every file of the environment bundle is fetched and verified
- ``uv_ready``: the bundle is downloaded and uv is there, so the install can begin. The user-data fetches uv while
  the agent's venv is unpacked and the agent starts, so its step is the time the install waited for uv (0 when uv
  came first)
- ``environment_installed``: the locked environment is installed (the machine is ready)
- ``first_task_started``: the first task's process was started
"""

from __future__ import annotations

import math
import os
from pathlib import Path

__all__ = ["FILE_NAME", "ORDER", "BootPhases", "parse"]

FILE_NAME = "boot-phases"
ORDER = (
    "kernel_boot",
    "bootstrap_start",
    "agent_venv_ready",
    "agent_up",
    "bundle_downloaded",
    "uv_ready",
    "environment_installed",
    "first_task_started",
)
_MAX_LINES = 64  # the file is ours, but a state dir is writable by root tasks: never read an unbounded one


def parse(text: str) -> dict[str, float]:
    """Known phase names to their first time; unknown names, bad numbers and extra lines are left out."""
    phases: dict[str, float] = {}
    for line in text.splitlines()[:_MAX_LINES]:
        parts = line.split()
        if len(parts) != 2 or parts[0] not in ORDER or parts[0] in phases:
            continue
        try:
            at = float(parts[1])
        except ValueError:
            continue
        if math.isfinite(at) and at > 0:
            phases[parts[0]] = at
    return phases


class BootPhases:
    """This machine's phase record in ``state_dir/boot-phases``."""

    def __init__(self, state_dir: Path) -> None:
        self.path = state_dir / FILE_NAME
        self._known = self._read()

    def _read(self) -> dict[str, float]:
        try:
            with self.path.open(encoding="utf-8", errors="replace") as file:
                return parse(file.read(_MAX_LINES * 64))
        except OSError:
            return {}

    def mark(self, name: str, at: float) -> None:
        """Record ``name`` at ``at`` unless it was recorded before (the first boot's time stands)."""
        if name not in ORDER:
            raise ValueError(f"unknown boot phase {name!r}")
        if name in self._known:
            return
        self._known[name] = at
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
            try:
                os.write(fd, f"{name} {at:.3f}\n".encode())
            finally:
                os.close(fd)
        except OSError:
            pass  # the record is for people; a full disk must not stop a task

    def as_dict(self) -> dict[str, float]:
        """Every recorded phase in the order of the way (the script's lines are read again: it may still run)."""
        self._known = {**self._read(), **self._known}
        return {name: self._known[name] for name in ORDER if name in self._known}
