"""Ending the child processes a test or a benchmark started."""

from __future__ import annotations

import subprocess
from typing import Any


def stop(proc: subprocess.Popen[Any], timeout: float) -> None:
    """SIGTERM, and SIGKILL when it has not exited within ``timeout`` seconds; either way it is reaped."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
