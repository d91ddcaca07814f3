"""What a remote call ended as, here: its value, or the exception to raise (the remote one itself when it
unpickles, chained from the remote traceback).

Split from pool.py, which delivers results, so single calls and chunked maps (chunks.py) decode them alike.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from rawvm_agent.call_worker import ERROR, LOST, OK

from rawvm.errors import RawvmError


class RemoteTraceback(Exception):
    """The formatted traceback of an exception raised on the machine; the ``__cause__`` of the local exception,
    as ``concurrent.futures`` does for process pools, so both tracebacks print."""

    def __init__(self, text: str) -> None:
        super().__init__(text)
        self.text = text

    def __str__(self) -> str:
        return f'\n"""\n{self.text.rstrip()}\n"""'


class RemoteError(RawvmError):
    """A remote failure that cannot be raised as itself: an exception that did not pickle (its type and message
    are here), or a call lost with its worker process or machine."""

    def __init__(self, message: str, type_name: str = "") -> None:
        super().__init__(message)
        self.type_name = type_name


def decode_result(loads: Callable[[bytes], Any], status: int, payload: bytes) -> tuple[bool, Any]:
    """(True, value) or (False, the exception to raise locally)."""
    if status == OK:
        return True, loads(payload)
    if status == LOST:
        return False, RemoteError(payload.decode(errors="replace"))
    if status == ERROR:
        exc, type_name, message, text = loads(payload)
        if not isinstance(exc, BaseException):
            exc = RemoteError(f"{type_name}: {message}", type_name)
        exc.__cause__ = RemoteTraceback(text)
        return False, exc
    return False, RemoteError(f"unknown result status {status}")
