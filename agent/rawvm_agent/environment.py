"""The environment tasks run in: a venv (or the agent's own Python), the work dir, and an optional conda prefix.

Its own module because tasks, batches and call workers all run in it, while only the installer builds it.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Environment:
    """Where tasks run: the venv (None: the agent's own Python) and the work dir holding the code."""

    venv: Path | None
    work_dir: Path
    conda_prefix: Path | None = None

    @property
    def bin_dir(self) -> Path:
        return self.venv / "bin" if self.venv else Path(sys.executable).parent

    def task_environ(self, base: Mapping[str, str]) -> dict[str, str]:
        """``base`` with the environment activated (what ``source bin/activate`` would do)."""
        env = dict(base)
        env.pop("NOTIFY_SOCKET", None)  # the task must not talk to systemd as if it were the agent
        env.pop("WATCHDOG_USEC", None)
        env.pop("WATCHDOG_PID", None)
        path = [str(self.bin_dir)]
        if self.conda_prefix is not None:
            path.append(str(self.conda_prefix / "bin"))
            env["CONDA_PREFIX"] = str(self.conda_prefix)
        if self.venv is not None:
            env["VIRTUAL_ENV"] = str(self.venv)
            env.pop("PYTHONHOME", None)
        env["PATH"] = os.pathsep.join([*path, env.get("PATH", os.defpath)])
        return env
