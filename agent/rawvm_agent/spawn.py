"""Start a task's process and wait for it on the event loop, with no thread per child and nothing process-wide.

``asyncio.create_subprocess_exec`` on Python 3.11 waits for each child in a thread of its own (the default
``ThreadedChildWatcher``) and reads its pipes through transports and stream protocols: for a batch of no-op
tasks that machinery was a large part of the agent's cost per task (issue 22). Here the process starts with
``subprocess.Popen`` (vfork), its exit is a pidfd (``os.pidfd_open``, Linux 5.3+) watched with
``loop.add_reader``, and its pipes are plain non-blocking fds read the same way. asyncio's child watcher is
left alone (setting a process-wide watcher once stalled the agent's tests), and so is every other child:
only ``Popen.poll`` of this one pid reaps it. Where pidfds are missing, the wait falls back to a thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
from collections.abc import Mapping, Sequence
from pathlib import Path

__all__ = ["Child", "PipeReader", "spawn"]


class PipeReader:
    """The read end of a child's pipe, read from the event loop without a transport."""

    def __init__(self, fd: int) -> None:
        os.set_blocking(fd, False)
        self.fd = fd

    async def read(self, size: int) -> bytes:
        """Up to ``size`` bytes; ``b""`` once every writer has closed its end."""
        loop = asyncio.get_running_loop()
        while True:
            try:
                return os.read(self.fd, size)
            except BlockingIOError:
                pass
            ready: asyncio.Future[None] = loop.create_future()
            loop.add_reader(self.fd, _settle, ready)
            try:
                await ready
            finally:
                loop.remove_reader(self.fd)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            os.close(self.fd)


def _settle(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


class Child:
    """A started process: ``pid``, ``returncode`` (None until it has been reaped) and ``wait``."""

    def __init__(self, popen: subprocess.Popen[bytes]) -> None:
        # The Popen object is kept until the child is reaped: dropped earlier, subprocess would reap it later
        # behind our back (its ``_active`` list) and the exit code would be lost.
        self._popen = popen
        self.pid = popen.pid
        self._waiting: asyncio.Future[int] | None = None

    @property
    def returncode(self) -> int | None:
        return self._popen.returncode

    async def wait(self) -> int:
        """The exit code (negative: killed by that signal), once the process has ended and been reaped."""
        if self._popen.returncode is not None:
            return self._popen.returncode
        if self._waiting is None:
            self._waiting = asyncio.ensure_future(self._reap())
        return await asyncio.shield(self._waiting)

    async def _reap(self) -> int:
        try:
            pidfd = os.pidfd_open(self.pid)
        except (AttributeError, OSError):  # no pidfds here (an old kernel): one thread for this wait
            return await asyncio.to_thread(self._popen.wait)
        loop = asyncio.get_running_loop()
        ended: asyncio.Future[None] = loop.create_future()
        loop.add_reader(pidfd, _settle, ended)
        try:
            while self._popen.poll() is None:  # readable means exited; poll reaps it (a zombie until then)
                await ended
                ended = loop.create_future()
                loop.add_reader(pidfd, _settle, ended)
        finally:
            loop.remove_reader(pidfd)
            os.close(pidfd)
        return self._popen.returncode


def spawn(argv: Sequence[str], *, cwd: Path, env: Mapping[str, str]) -> tuple[Child, PipeReader, PipeReader]:
    """Start ``argv`` in its own session (so a stop reaches its whole process group), stdin from /dev/null,
    stdout and stderr into pipes returned with it.

    Raises ``OSError`` (not found, not executable, a bad cwd) or ``ValueError`` as ``Popen`` does."""
    out_r, out_w = os.pipe()
    err_r, err_w = os.pipe()
    try:
        popen = subprocess.Popen(
            list(argv), cwd=cwd, env=dict(env), stdin=subprocess.DEVNULL, stdout=out_w, stderr=err_w,
            start_new_session=True,
        )  # fmt: skip
    except BaseException:
        for fd in (out_r, err_r):
            os.close(fd)
        raise
    finally:
        os.close(out_w)
        os.close(err_w)
    return Child(popen), PipeReader(out_r), PipeReader(err_r)
