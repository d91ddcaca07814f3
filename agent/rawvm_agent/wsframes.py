"""What the agent's websocket routes (shell, files, forward) and their laptop clients share: the socket both ends
are seen as, and reading one message as bytes or a JSON object.

A websocket rather than a streamed HTTP body because these sessions talk both ways (keys in, output out; a file
in, its verdict back) and because its heartbeat tells a vanished laptop from a quiet one: the session ends, and
the machine's idle clock can start (presence.py). Lives in the agent package so the laptop (which may import the
agent's modules, never the reverse) speaks the very same frames.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any, Protocol

import aiohttp

HEARTBEAT_S = 15.0  # a ping this often; no pong within half of it closes the session
MAX_MESSAGE_BYTES = 4 << 20  # aiohttp's default limit, said out loud: every sender's chunks stay under it
CHUNK_BYTES = 1 << 20  # file data per binary message
PIPE_BYTES = 1 << 16  # one read of a forwarded TCP connection


class SessionClosed(Exception):
    """The other end closed the websocket (or it broke) before the session's end was said."""


class Socket(Protocol):
    """What both aiohttp websocket classes (the server's ``WebSocketResponse``, the client's
    ``ClientWebSocketResponse``) offer, so one piece of code serves both ends."""

    async def send_bytes(self, data: bytes) -> None: ...

    async def send_str(self, data: str) -> None: ...

    async def receive(self, timeout: float | None = None) -> aiohttp.WSMessage: ...


async def send_json(ws: Socket, message: dict[str, Any]) -> None:
    """A control message: one JSON object in a text frame."""
    await ws.send_str(json.dumps(message))


def decode(message: aiohttp.WSMessage) -> bytes | dict[str, Any]:
    """A binary frame's bytes, or a text frame's JSON object; SessionClosed for a close, an error, or a text frame
    that is not a JSON object (a peer speaking something else)."""
    if message.type == aiohttp.WSMsgType.BINARY:
        data: bytes = message.data
        return data
    if message.type == aiohttp.WSMsgType.TEXT:
        try:
            body = json.loads(message.data)
        except ValueError:
            body = None
        if not isinstance(body, dict):
            raise SessionClosed("a control message that is not a JSON object")
        return body
    raise SessionClosed(_closed_words(message))


async def receive(ws: Socket, timeout: float | None = None) -> bytes | dict[str, Any]:
    """The next message (``decode``)."""
    return decode(await ws.receive(timeout))


async def pipe(ws: Socket, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Bytes both ways between a TCP connection and a websocket until either side ends (``rawvm forward``, on
    the machine and on the laptop alike); the caller closes both."""

    async def outward() -> None:
        while data := await reader.read(PIPE_BYTES):
            await ws.send_bytes(data)

    async def inward() -> None:
        while True:
            message = await receive(ws)
            if isinstance(message, bytes):
                writer.write(message)
                await writer.drain()

    tasks = [asyncio.ensure_future(outward()), asyncio.ensure_future(inward())]
    await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


def _closed_words(message: aiohttp.WSMessage) -> str:
    if message.type == aiohttp.WSMsgType.ERROR:
        return f"the connection broke ({message.data})"
    return "the other end closed the connection"
