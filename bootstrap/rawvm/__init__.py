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


def dask_cluster(*args: Any, **kwargs: Any) -> Any:
    """A Dask cluster on rawvm machines (TLS, adaptive, gone when idle); see ``rawvm.dask_cluster.dask_cluster``.
    Needs the ``dask`` extra."""
    from rawvm.dask_cluster import dask_cluster as _dask_cluster

    return _dask_cluster(*args, **kwargs)


__all__ = ["RawvmError", "UsageError", "dask_cluster", "run"]
