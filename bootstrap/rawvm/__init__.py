"""rawvm: run Python work on raw cloud VMs with your own environment, and leave nothing running.

The front door: ``rawvm.run(...)``, ``rawvm.up``, ``rawvm.batch``, ``@rawvm.function``, ``rawvm.dask_cluster``,
``rawvm.ls/logs/down``, and the ``rawvm`` CLI. ``import rawvm`` stays cheap (the CLI starts fast): each name is
imported on first use, and type checkers and ``help()`` see the real, typed functions of ``rawvm.api``.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from rawvm.errors import RawvmError, UsageError

if TYPE_CHECKING:
    from rawvm.api import ClusterView, RunResult, batch, dask_cluster, down, function, logs, ls, run, up
    from rawvm.functions.pool import RemoteError, RemoteTraceback
    from rawvm.functions.remote import RemoteFunction
    from rawvm.options import CostCap, Environment, LaunchOptions, Lifetime, MachineRequest

__version__ = "0.1.0"

# name -> the module that defines it, imported on first use
_LAZY = {
    "run": "rawvm.api",
    "up": "rawvm.api",
    "batch": "rawvm.api",
    "dask_cluster": "rawvm.api",
    "function": "rawvm.api",
    "ls": "rawvm.api",
    "logs": "rawvm.api",
    "down": "rawvm.api",
    "RunResult": "rawvm.api",
    "ClusterView": "rawvm.api",
    "RemoteError": "rawvm.functions.pool",
    "RemoteTraceback": "rawvm.functions.pool",
    "RemoteFunction": "rawvm.functions.remote",
    "LaunchOptions": "rawvm.options",
    "MachineRequest": "rawvm.options",
    "Lifetime": "rawvm.options",
    "Environment": "rawvm.options",
    "CostCap": "rawvm.options",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'rawvm' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_LAZY])


__all__ = [
    "ClusterView",
    "CostCap",
    "Environment",
    "LaunchOptions",
    "Lifetime",
    "MachineRequest",
    "RawvmError",
    "RemoteError",
    "RemoteFunction",
    "RemoteTraceback",
    "RunResult",
    "UsageError",
    "batch",
    "dask_cluster",
    "down",
    "function",
    "logs",
    "ls",
    "run",
    "up",
]
