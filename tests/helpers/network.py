"""Retrying what a test asks of the network after a transient failure, with backoff, before failing.

A fresh machine's resolver drops a lookup now and then (``Temporary failure in name resolution``) while the index
is otherwise reachable; one such hiccup must not fail five session fixtures and every test that uses them.
``with_retries`` reruns the step when the failure (an exception, or the output of a process that failed) says
DNS, a reset or a refused connection; anything else -- a real conflict, a 404, a bug -- fails at once.
"""

from __future__ import annotations

import errno
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from typing import TypeVar

__all__ = ["DELAYS", "TRANSIENT_TEXT", "is_transient", "with_retries"]

T = TypeVar("T")

DELAYS = (1.0, 3.0, 9.0)  # seconds before each retry: about 13 s in all, then the failure stands
TRANSIENT_TEXT = (
    "temporary failure in name resolution",
    "failed to lookup address information",
    "dns error",
    "name or service not known",
    "connection reset",
    "connection refused",
    "connection aborted",
    "remote end closed connection",
    "network is unreachable",
    "error sending request",
)
_TRANSIENT_ERRNOS = {errno.ECONNRESET, errno.ECONNREFUSED, errno.ECONNABORTED, errno.ENETUNREACH, errno.EPIPE}


def _chain(exc: BaseException) -> Iterator[BaseException]:
    """``exc`` and its causes (a ResolverError raised from a URLError raised from a gaierror...)."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        current = current.__cause__ or current.__context__


def _text(exc: BaseException) -> str:
    parts = [str(exc)]
    if isinstance(exc, subprocess.CalledProcessError):
        for stream in (exc.stdout, exc.stderr):
            parts.append(stream.decode(errors="replace") if isinstance(stream, bytes) else str(stream or ""))
    return " ".join(parts).lower()


def is_transient(exc: BaseException) -> bool:
    """The failure is the network's passing trouble (DNS, a reset, a refused connection), not the request's."""
    for error in _chain(exc):
        if isinstance(error, socket.gaierror) and error.errno in (socket.EAI_AGAIN, socket.EAI_NONAME):
            return True
        if isinstance(error, ConnectionError) or (isinstance(error, OSError) and error.errno in _TRANSIENT_ERRNOS):
            return True
        if any(marker in _text(error) for marker in TRANSIENT_TEXT):
            return True
    return False


def with_retries(
    step: Callable[[], T],
    *,
    delays: tuple[float, ...] = DELAYS,
    sleep: Callable[[float], None] = time.sleep,
    transient: Callable[[BaseException], bool] = is_transient,
) -> T:
    """``step()``, rerun after each of ``delays`` while it fails transiently; its last failure otherwise."""
    for delay in (*delays, None):
        try:
            return step()
        except Exception as exc:
            if delay is None or not transient(exc):
                raise
        sleep(delay)
    raise AssertionError("unreachable")  # the last delay is None: the loop returns or raises
