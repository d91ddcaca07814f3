"""The environment's venv made by the standard library's ``venv``, in the agent's own process, when it can be.

Why not always ``uv venv``: on a fresh machine uv is still arriving (the user-data fetches it below the agent in
priority) when the bundle's manifest says a venv is wanted, and ``uv venv``'s first run queries the interpreter in
a new process while cloud-init's last stage runs beside it (1.6 s in the qemu bench, issue 22). The stdlib writes
the same few files (``pyvenv.cfg``, the ``bin/python*`` links, the activate scripts) from the agent's process in
a fraction of that, before uv is there at all; ``uv pip sync`` then fills it as it fills a venv of its own.

It serves only the interpreter the agent itself runs on (``sys._base_executable``, the real one behind the
agent's venv) and only when the bundle's Python is that one's version: any other (another version, a conda
prefix's python, a path) is uv's, which can find or fetch it.
"""

from __future__ import annotations

import sys
import venv
from pathlib import Path


def serves(python: str) -> bool:
    """Whether the bundle's ``[target] python`` (``"3.12"``, ``"3.12.7"``, or empty for any) is the version of the
    interpreter the agent runs on."""
    if not python:
        return True
    ours = sys.version_info
    return python in (f"{ours.major}.{ours.minor}", f"{ours.major}.{ours.minor}.{ours.micro}")


def make(path: Path) -> None:
    """A venv at ``path`` (the installer removed any old one) on the agent's own interpreter, without pip: uv
    installs into it. Symlinks, as uv's own venvs: nothing of the interpreter is copied."""
    venv.EnvBuilder(symlinks=True, with_pip=False).create(path)
