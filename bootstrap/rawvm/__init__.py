"""rawvm: run Python work on raw cloud VMs with your own environment, and leave nothing running.

The front door: ``rawvm.run(...)`` and the ``rawvm`` CLI.
"""

from __future__ import annotations

from typing import Any

from rawvm.errors import RawvmError, UsageError

__version__ = "0.1.0"


def run(*args: Any, **kwargs: Any) -> Any:
    """Lock the environment, launch machines, run a command, stream its output; see ``rawvm.api.run``."""
    from rawvm.api import run as _run

    return _run(*args, **kwargs)


def batch(*args: Any, **kwargs: Any) -> Any:
    """Run a command once per task id or value over many machines; see ``rawvm.batches.batch``."""
    from rawvm.batches import batch as _batch

    return _batch(*args, **kwargs)


__all__ = ["RawvmError", "UsageError", "batch", "run"]
