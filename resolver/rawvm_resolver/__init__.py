"""rawvm's resolver: scan a Python environment, translate it for a Linux target, lock it with uv."""

from rawvm_resolver.api import LockResult, lock
from rawvm_resolver.target import Target

__version__ = "0.1.0"
__all__ = ["LockResult", "Target", "__version__", "lock"]
