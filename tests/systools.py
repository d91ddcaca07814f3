"""What a test needs from the machine: a system tool, the package index, the VM tools.

On a developer's fresh machine a missing need is a skip whose reason says what to install. Under CI
(``CI=true``, as ``.ci/run`` runs) the same absence is a failure, so CI cannot go green without the real tools.
"""

from __future__ import annotations

import functools
import os
import shutil
import socket
from typing import NoReturn

import pytest

INDEX_HOST = "pypi.org"


def in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in {"1", "true", "yes"}


def missing(what: str, remedy: str, *, verb: str = "is") -> NoReturn:
    """Skip (fresh machine) or fail (CI) a test whose need is not met, naming what to do about it."""
    if in_ci():
        pytest.fail(f"{what} {verb} missing, and CI must run this test for real: {remedy}", pytrace=False)
    pytest.skip(f"{what} {verb} missing: {remedy}")


def tool_path(name: str) -> str | None:
    """The tool on PATH, sbin included (debootstrap and mkfs live there)."""
    path = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin"])
    return shutil.which(name, path=path)


def need_tool(name: str, package: str) -> str:
    """The path of ``name``; a skip (or, under CI, a failure) naming the Debian package when it is absent."""
    found = tool_path(name)
    if found is None:
        missing(f"{name} (Debian package {package})", f"apt-get install {package}, or run bash .ci/run")
    return found


@functools.cache
def index_reachable(host: str = INDEX_HOST, timeout: float = 5.0) -> bool:
    """Whether the index answers; asked again after a transient failure (one dropped DNS lookup must not skip,
    or under CI fail, every network test of the session: the answer is cached)."""
    from tests.helpers.network import with_retries

    def connect() -> bool:
        with socket.create_connection((host, 443), timeout=timeout):
            return True

    try:
        return with_retries(connect, delays=(0.5, 2.0, 5.0))
    except OSError:
        return False


def need_index() -> None:
    if not index_reachable():
        missing(f"the package index ({INDEX_HOST}:443)", "these tests resolve against PyPI; run them with network")


def need_vm_tools() -> None:
    from rawvm_images.local_vm import missing_tools

    if absent := missing_tools():
        missing(
            f"the VM tool{'s' if len(absent) > 1 else ''} {', '.join(absent)}",
            "apt-get install qemu-system-x86 qemu-utils debootstrap cloud-image-utils",
            verb="is" if len(absent) == 1 else "are",
        )
