"""``rawvm shell``'s machine side: a command (a login shell by default) on a pseudo-terminal, or on pipes when the
laptop has no terminal, wired to a websocket (``GET /v1/shell``, registered by interactive_api.py).

The laptop's first message is ``{"command": STR, "tty": BOOL, "rows": R, "cols": C, "term": TERM}``. Then binary
messages from the laptop are the command's input, byte for byte (so Ctrl-C and Ctrl-D reach the terminal's line
discipline as they would over SSH), and text messages are controls: ``{"resize": [rows, cols]}`` (TIOCSWINSZ;
the kernel sends SIGWINCH), ``{"eof": true}`` (closes a piped stdin). Binary messages to the laptop are output,
their first byte the stream (1 stdout, 2 stderr; a terminal has only 1). The last message is ``{"exit": CODE}``
(128 + N for a signal N), or ``{"error": MESSAGE}`` when the command could not start. A laptop that goes away ends
the command: SIGHUP to its process group, SIGKILL after a grace.

A command is run by ``/bin/sh -c`` as ssh does (words joined with spaces), in the task environment (the locked
venv on PATH) and the work dir, with the agent's own environment (so the token is never in it).
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
import shutil
import signal
import struct
import termios
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rawvm_agent.wsframes import SessionClosed, Socket, decode, send_json

READ_BYTES = 1 << 16
KILL_GRACE_S = 5.0
DRAIN_AFTER_EXIT_S = 2.0  # output still in flight once the command has exited (a pty may never signal EOF)
STDOUT, STDERR = 1, 2


class ShellError(Exception):
    """A shell request that cannot be run; the message is one line for the laptop."""


@dataclass(frozen=True)
class ShellRequest:
    command: str
    tty: bool
    rows: int
    cols: int
    term: str

    @classmethod
    def from_json(cls, body: Any) -> ShellRequest:
        if not isinstance(body, dict):
            raise ShellError("the first message must be {command, tty, rows, cols, term}")
        command, term = body.get("command", ""), body.get("term", "") or "xterm-256color"
        rows, cols = body.get("rows", 24), body.get("cols", 80)
        if not isinstance(command, str) or "\0" in command or not isinstance(term, str) or "\0" in term:
            raise ShellError("'command' and 'term' must be strings without NUL")
        if not all(isinstance(n, int) and 0 < n < 10000 for n in (rows, cols)):
            raise ShellError("'rows' and 'cols' must be numbers of characters")
        return cls(command=command, tty=bool(body.get("tty")), rows=rows, cols=cols, term=term)

    def argv(self) -> list[str]:
        if self.command:
            return ["/bin/sh", "-c", self.command]
        login = os.environ.get("SHELL") or shutil.which("bash") or "/bin/sh"
        return [login, "-l"] if self.tty else [login]


def _winsize(rows: int, cols: int) -> bytes:
    return struct.pack("HHHH", rows, cols, 0, 0)


class Running:
    """One started command: its pid (a process group of its own), its input, its output streams."""

    def __init__(self, pid: int, outputs: list[tuple[int, asyncio.StreamReader]], master: int | None = None) -> None:
        self.pid = pid
        self.outputs = outputs
        self.master = master  # the pty's master end; None on pipes
        self.stdin: asyncio.StreamWriter | None = None
        self.transports: list[asyncio.BaseTransport] = []  # the pty's reading end, closed when the session ends

    async def write(self, data: bytes) -> None:
        if self.master is not None:
            view = memoryview(data)
            while view:
                try:
                    view = view[os.write(self.master, view) :]
                except BlockingIOError:
                    await asyncio.sleep(0.01)  # the terminal's input queue is full: the command reads slowly
        elif self.stdin is not None and not self.stdin.is_closing():
            self.stdin.write(data)
            await self.stdin.drain()

    def resize(self, rows: int, cols: int) -> None:
        if self.master is not None:
            fcntl.ioctl(self.master, termios.TIOCSWINSZ, _winsize(rows, cols))

    def close_stdin(self) -> None:
        if self.stdin is not None:
            self.stdin.close()

    def signal_group(self, sig: int) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pid, sig)

    async def wait(self) -> int:
        """The exit code once the command has ended: 128 + N when signal N ended it."""
        loop = asyncio.get_running_loop()
        try:
            pidfd = os.pidfd_open(self.pid)
        except OSError:
            status = (await loop.run_in_executor(None, os.waitpid, self.pid, 0))[1]
        else:
            ended: asyncio.Future[None] = loop.create_future()

            def readable() -> None:
                if not ended.done():
                    ended.set_result(None)

            loop.add_reader(pidfd, readable)
            try:
                await ended
            finally:
                loop.remove_reader(pidfd)
                os.close(pidfd)
            status = os.waitpid(self.pid, 0)[1]
        code = os.waitstatus_to_exitcode(status)
        return 128 - code if code < 0 else code


async def _reader_of(fd: int) -> tuple[asyncio.StreamReader, asyncio.BaseTransport]:
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=READ_BYTES * 4)
    protocol = asyncio.StreamReaderProtocol(reader)
    transport, _ = await loop.connect_read_pipe(lambda: protocol, os.fdopen(fd, "rb", buffering=0))
    return reader, transport


async def start(request: ShellRequest, environ: Mapping[str, str], cwd: Path) -> Running:
    """Start the request's command: on a new pseudo-terminal (its own session, the terminal its controlling one)
    or on pipes in a new session."""
    env = {**environ, "TERM": request.term}
    argv = request.argv()
    if not request.tty:
        proc = await asyncio.create_subprocess_exec(
            *argv,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            cwd=cwd,
            env=env,
            start_new_session=True,
        )
        assert proc.stdout is not None and proc.stderr is not None
        running = Running(proc.pid, [(STDOUT, proc.stdout), (STDERR, proc.stderr)])
        running.stdin = proc.stdin
        running.wait = proc.wait  # type: ignore[method-assign]  # asyncio reaps its own children
        return running
    size = _winsize(request.rows, request.cols)
    pid, master = os.forkpty()
    if pid == 0:  # the child: only what exec needs, then exec (or say why not, and exit 127)
        try:
            fcntl.ioctl(0, termios.TIOCSWINSZ, size)
            os.chdir(cwd)
            os.execvpe(argv[0], argv, env)  # noqa: S606 - argv is a shell and its -c, as ssh runs it
        except BaseException as exc:  # nothing may escape a forked child
            os.write(2, f"rawvm shell: cannot run {argv[0]}: {exc}\r\n".encode())
        finally:
            os._exit(127)
    output = os.dup(master)  # the reading end belongs to the pipe transport, which closes it
    os.set_blocking(master, False)
    reader, transport = await _reader_of(output)
    running = Running(pid, [(STDOUT, reader)], master=master)
    running.transports.append(transport)
    return running


async def _pump(ws: Socket, stream: int, reader: asyncio.StreamReader) -> None:
    while True:
        try:
            data = await reader.read(READ_BYTES)
        except OSError:  # EIO: every holder of the terminal's other end has closed it
            return
        if not data:
            return
        await ws.send_bytes(bytes([stream]) + data)


async def _feed(ws: Socket, running: Running) -> None:
    """The laptop's input and controls until it closes (or breaks) the websocket."""
    while True:
        try:
            message = decode(await ws.receive())
        except SessionClosed:
            return
        if isinstance(message, bytes):
            await running.write(message)
        elif isinstance(resize := message.get("resize"), list) and len(resize) == 2:
            with contextlib.suppress(OSError, TypeError, struct.error):
                running.resize(int(resize[0]), int(resize[1]))
        elif message.get("eof"):
            running.close_stdin()


_ENDING: set[asyncio.Future[None]] = set()  # commands being ended after their session: held until reaped


async def _end(running: Running, exited: asyncio.Future[int]) -> None:
    """End a command whose laptop went away as a closed terminal would: SIGHUP (and SIGCONT, should it be
    stopped) to its process group, SIGKILL after a grace; reaped either way."""
    running.signal_group(signal.SIGHUP)
    running.signal_group(signal.SIGCONT)
    done, _ = await asyncio.wait([exited], timeout=KILL_GRACE_S)
    if not done:
        running.signal_group(signal.SIGKILL)
    with contextlib.suppress(Exception):
        await exited


async def serve(ws: Socket, request: ShellRequest, environ: Mapping[str, str], cwd: Path) -> None:
    """Run the session to its end: the command's exit, or the laptop's going (also when aiohttp cancels this
    handler because the connection dropped: the command is ended in the background then)."""
    try:
        running = await start(request, environ, cwd)
    except OSError as exc:
        await send_json(ws, {"error": f"cannot start {request.argv()[0]}: {exc.strerror or exc}"})
        return
    pumps = [asyncio.ensure_future(_pump(ws, stream, reader)) for stream, reader in running.outputs]
    feed = asyncio.ensure_future(_feed(ws, running))
    exited = asyncio.ensure_future(running.wait())
    try:
        await asyncio.wait([feed, exited], return_when=asyncio.FIRST_COMPLETED)
        if exited.done():
            await asyncio.wait(pumps, timeout=DRAIN_AFTER_EXIT_S)
            with contextlib.suppress(ConnectionError, RuntimeError):
                await send_json(ws, {"exit": exited.result()})
    finally:
        for task in (*pumps, feed):
            task.cancel()
        if not exited.done():
            ending = asyncio.ensure_future(_end(running, exited))
            _ENDING.add(ending)
            ending.add_done_callback(_ENDING.discard)
        for transport in running.transports:
            transport.close()
        if running.master is not None:
            os.close(running.master)
