"""How the agent learns that a task's process ended: a pidfd on the event loop, not a thread per process.

Python 3.8 to 3.11 watch asyncio subprocesses with ``ThreadedChildWatcher``: one thread started (and joined) per
process, whose start handshake was a fifth of a tiny batch task's cost on a busy machine (issue 22). A pidfd
(Linux 5.3+) is one more file descriptor on the loop. Python 3.12 and later choose it by themselves, and 3.14
drops the watcher API: there, and where pidfds are not available, nothing changes.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys
import warnings
from collections.abc import Callable
from typing import Any

__all__ = ["use_pidfd_watcher"]

_done = False


class _PidfdWatcher(asyncio.AbstractChildWatcher):
    """asyncio's PidfdChildWatcher, but for whichever loop starts the process (3.11's is tied to one loop, and
    the agent's tests run many loops in one process)."""

    def __init__(self) -> None:
        self._watched: dict[int, tuple[asyncio.AbstractEventLoop, int, Callable[..., object], tuple[Any, ...]]] = {}

    def add_child_handler(self, pid: int, callback: Callable[..., object], *args: Any) -> None:  # type: ignore[override]
        loop = asyncio.get_running_loop()
        pidfd = os.pidfd_open(pid)
        self._watched[pid] = (loop, pidfd, callback, args)
        loop.add_reader(pidfd, self._reap, pid)

    def _reap(self, pid: int) -> None:
        try:
            # Never a blocking wait on the loop: a pidfd that reads ready before the child can be reaped waits.
            reaped, status = os.waitpid(pid, os.WNOHANG)
            if reaped == 0:
                return
            code = os.waitstatus_to_exitcode(status)
        except ChildProcessError:  # reaped elsewhere: asyncio's own watchers say 255 too
            code = 255
        loop, pidfd, callback, args = self._watched.pop(pid)
        loop.remove_reader(pidfd)
        os.close(pidfd)
        callback(pid, code, *args)

    def remove_child_handler(self, pid: int) -> bool:
        watched = self._watched.pop(pid, None)
        if watched is None:
            return False
        watched[0].remove_reader(watched[1])
        os.close(watched[1])
        return True

    def attach_loop(self, loop: asyncio.AbstractEventLoop | None) -> None:
        pass  # every process is watched on the loop that started it

    def close(self) -> None:
        pass

    def is_active(self) -> bool:
        return True

    def __enter__(self) -> _PidfdWatcher:
        return self

    def __exit__(self, *exc: object) -> None:
        pass


def use_pidfd_watcher() -> None:
    """Once per process: subprocesses started from any event loop are watched with a pidfd, where that helps."""
    global _done
    if _done or sys.version_info >= (3, 12) or not sys.platform.startswith("linux"):
        return
    _done = True
    try:
        os.close(os.pidfd_open(os.getpid()))
    except (AttributeError, OSError):  # no pidfd on this kernel (or in this sandbox): keep the threads
        return
    with warnings.catch_warnings(), contextlib.suppress(Exception):
        warnings.simplefilter("ignore", DeprecationWarning)
        asyncio.set_child_watcher(_PidfdWatcher())
