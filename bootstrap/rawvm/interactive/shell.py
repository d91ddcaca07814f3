"""``rawvm shell CLUSTER [MACHINE] [-- CMD]``: the laptop's end of ``GET /v1/shell`` (``rawvm_agent.shell``).

On a terminal, the terminal goes raw for the session (every key, Ctrl-C and Ctrl-D included, travels as bytes to
the machine's pseudo-terminal, which does what a local one would) and is restored however the session ends;
SIGWINCH sends the new size. Without a terminal (a pipe, a script), CMD runs on pipes: stdout and stderr stay
apart, and the end of stdin closes the command's. Either way the exit code is the remote command's.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
import termios
import threading
import tty
from collections.abc import Iterator, Sequence

from rawvm_agent.wsframes import SessionClosed, receive, send_json

from rawvm.agent.client import AgentWebSocket
from rawvm.errors import RawvmError
from rawvm.interactive.target import machine_client

LOST_EXIT_CODE = 255  # as ssh: the session ended without the command's exit code
STDIN_QUEUE = 16  # chunks read ahead of the websocket


def _size(fd: int) -> tuple[int, int]:
    try:
        columns, lines = os.get_terminal_size(fd)
    except OSError:
        return 24, 80
    return lines or 24, columns or 80


@contextlib.contextmanager
def _raw(fd: int, enabled: bool) -> Iterator[None]:
    """The terminal in raw mode for the block, restored afterwards (also after an error)."""
    if not enabled:
        yield
        return
    saved = termios.tcgetattr(fd)
    tty.setraw(fd, termios.TCSANOW)  # not TCSAFLUSH: keys typed while connecting still count
    try:
        yield
    finally:
        termios.tcsetattr(fd, termios.TCSADRAIN, saved)


def _start_stdin_reader(fd: int, queue: asyncio.Queue[bytes], loop: asyncio.AbstractEventLoop) -> None:
    """A daemon thread reading stdin into ``queue`` (b"" at its end): it works for a terminal, a pipe and a regular
    file alike (the event loop cannot watch a file), and its blocking read never holds the process at exit."""

    def pump() -> None:
        while True:
            try:
                data = os.read(fd, 1 << 16)
            except OSError:
                data = b""
            try:
                asyncio.run_coroutine_threadsafe(queue.put(data), loop).result()
            except RuntimeError:  # the loop has closed: the session is over
                return
            if not data:
                return

    threading.Thread(target=pump, name="rawvm-shell-stdin", daemon=True).start()


async def _send_input(ws: AgentWebSocket, queue: asyncio.Queue[bytes], on_tty: bool) -> None:
    while True:
        data = await queue.get()
        if not data:
            if not on_tty:
                await send_json(ws, {"eof": True})
            return
        await ws.send_bytes(data)


def _write(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


async def _receive_output(ws: AgentWebSocket) -> int | None:
    """Write the command's output until its exit code arrives; the code (None: the connection was lost first)."""
    while True:
        try:
            message = await receive(ws)
        except SessionClosed:
            return None
        if isinstance(message, bytes):
            if message:
                _write(2 if message[0] == 2 else 1, message[1:])
        elif "exit" in message:
            return int(message["exit"])
        elif "error" in message:
            raise RawvmError(str(message["error"]))


async def session(cluster: str, machine: str, command: Sequence[str]) -> int:
    """Run the shell (or ``command``) on the machine; its exit code."""
    async with machine_client(cluster, machine) as (mid, client), client.websocket("/v1/shell") as ws:
        code = await _attached(ws, " ".join(command))
    if code is None:
        print(f"rawvm: the session with {mid} ended without an exit code (connection lost)", file=sys.stderr)
        return LOST_EXIT_CODE
    return code


async def _attached(ws: AgentWebSocket, command: str) -> int | None:
    """This terminal (or these pipes) wired to the session until the remote exit code comes."""
    stdin, stdout = sys.stdin.fileno(), sys.stdout.fileno()
    on_tty = os.isatty(stdin) and os.isatty(stdout)
    rows, cols = _size(stdout)
    term = os.environ.get("TERM", "xterm-256color")
    await send_json(ws, {"command": command, "tty": on_tty, "rows": rows, "cols": cols, "term": term})
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[bytes] = asyncio.Queue(STDIN_QUEUE)
    if on_tty:
        resizes: set[asyncio.Task[None]] = set()  # held until sent (the loop keeps only weak references)

        def resized() -> None:  # the size now, read when the signal comes
            task = loop.create_task(send_json(ws, {"resize": list(_size(stdout))}))
            resizes.add(task)
            task.add_done_callback(resizes.discard)

        loop.add_signal_handler(signal.SIGWINCH, resized)
    feeding: asyncio.Future[None] | None = None
    try:
        with _raw(stdin, on_tty):  # raw before the first read: no line of type-ahead is read cooked
            _start_stdin_reader(stdin, queue, loop)
            feeding = asyncio.ensure_future(_send_input(ws, queue, on_tty))
            return await _receive_output(ws)
    finally:
        if feeding is not None:
            feeding.cancel()
            await asyncio.gather(feeding, return_exceptions=True)
        if on_tty:
            loop.remove_signal_handler(signal.SIGWINCH)
