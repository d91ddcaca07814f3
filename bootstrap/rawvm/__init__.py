"""rawvm: run Python work on raw cloud VMs with your own environment, and leave nothing running.

The front door: ``rawvm.run(...)``, ``@rawvm.function`` and the ``rawvm`` CLI.
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
    """Run a command once per task id or value over many machines; see ``rawvm.batches.array.batch``."""
    from rawvm.batches.array import batch as _batch

    return _batch(*args, **kwargs)


def dask_cluster(*args: Any, **kwargs: Any) -> Any:
    """A Dask cluster on rawvm machines (TLS, adaptive, gone when idle); see ``rawvm.dask.cluster.dask_cluster``.
    Needs the ``dask`` extra."""
    from rawvm.dask.cluster import dask_cluster as _dask_cluster

    return _dask_cluster(*args, **kwargs)


def function(*args: Any, **kwargs: Any) -> Any:
    """``@rawvm.function(n=3, keepalive="30s")``: run a Python function on machines; see ``rawvm.functions.remote``."""
    from rawvm.functions.remote import function as _function

    return _function(*args, **kwargs)


def __getattr__(name: str) -> Any:
    # Imported on first use: ``import rawvm`` stays cheap for the CLI.
    if name in ("RemoteTraceback", "RemoteError"):
        from rawvm.functions import pool as function_pool

        return getattr(function_pool, name)
    if name == "RemoteFunction":
        from rawvm.functions.remote import RemoteFunction

        return RemoteFunction
    raise AttributeError(f"module 'rawvm' has no attribute {name!r}")


__all__ = [
    "RawvmError",
    "RemoteError",
    "RemoteFunction",
    "RemoteTraceback",
    "UsageError",
    "batch",
    "dask_cluster",
    "function",
    "run",
]
