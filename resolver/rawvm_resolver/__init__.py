"""rawvm's resolver: scan a Python environment, translate it for a Linux target, lock it with uv.

The names load on first use: ``import rawvm_resolver.errors`` (what every rawvm command imports) must not pull in the
whole resolver (uv driving, urllib3, packaging's parsers: ~90 ms of a warm ``rawvm run --cluster``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from rawvm_resolver.api import LockResult, lock
    from rawvm_resolver.target import Target

__version__ = "0.1.0"
__all__ = ["LockResult", "Target", "__version__", "lock"]

_LAZY = {"LockResult": "rawvm_resolver.api", "lock": "rawvm_resolver.api", "Target": "rawvm_resolver.target"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'rawvm_resolver' has no attribute {name!r}")
