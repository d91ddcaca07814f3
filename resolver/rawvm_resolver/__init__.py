"""rawvm's resolver: scan a Python environment, translate it for a Linux target, lock it with uv."""

__version__ = "0.1.0"
