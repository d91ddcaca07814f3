"""The session websockets of a real in-process Agent (interactive_api.py): a pty's size and exit code, a command
ended when its laptop goes away, sessions counted as presence, and the forward to a loopback port."""

from __future__ import annotations

import asyncio
import json
import os
import time
from pathlib import Path
from typing import Any

import aiohttp
import psutil
from aiohttp.test_utils import TestClient

from tests.agent.app_helpers import AUTH, ServeAgent
from tests.agent.core_helpers import agent_config, free_port


async def _output_until_exit(ws: aiohttp.ClientWebSocketResponse) -> tuple[bytes, Any]:
    out = b""
    async for message in ws:
        if message.type == aiohttp.WSMsgType.BINARY:
            out += message.data[1:]
        elif message.type == aiohttp.WSMsgType.TEXT:
            return out, json.loads(message.data)
    return out, None


async def _client(serve_agent: ServeAgent, tmp_path: Path) -> tuple[Any, TestClient[Any, Any]]:
    return await serve_agent(agent_config(tmp_path / "state"))


async def test_a_pty_has_the_asked_size_and_gives_the_exit_code(serve_agent: ServeAgent, tmp_path: Path) -> None:
    _, client = await _client(serve_agent, tmp_path)
    async with client.ws_connect("/v1/shell", headers=AUTH) as ws:
        first = {"command": "tty; stty size; echo $TERM; exit 7", "tty": True, "rows": 33, "cols": 77, "term": "vt100"}
        await ws.send_str(json.dumps(first))
        out, last = await _output_until_exit(ws)
    assert last == {"exit": 7}
    lines = out.decode().split()
    assert lines[0].startswith("/dev/pts/") and lines[1:] == ["33", "77", "vt100"]


async def test_a_laptop_that_goes_away_ends_its_command_and_its_presence(
    serve_agent: ServeAgent, tmp_path: Path
) -> None:
    agent, client = await _client(serve_agent, tmp_path)
    ws = await client.ws_connect("/v1/shell", headers=AUTH)
    await ws.send_str(json.dumps({"command": "echo $$; exec sleep 300", "tty": False}))
    message = await ws.receive(timeout=10)
    pid = int(message.data[1:])
    assert message.data[0] == 1 and psutil.pid_exists(pid)
    assert agent.people.counts()["shell"] == 1 and agent.people.busy()
    await ws.close()  # the agent sees the session end without an exit: a closed terminal
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and (psutil.pid_exists(pid) or agent.people.counts()["shell"]):
        await asyncio.sleep(0.1)
    assert not psutil.pid_exists(pid), "the command outlived its laptop"
    assert agent.people.counts() == {"shell": 0, "forward": 0, "files": 0, "sync": 0}


async def test_forward_pipes_bytes_to_a_loopback_port(serve_agent: ServeAgent, tmp_path: Path) -> None:
    agent, client = await _client(serve_agent, tmp_path)

    async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while data := await reader.read(1 << 16):
            writer.write(data.upper())
            await writer.drain()
        writer.close()

    server = await asyncio.start_server(echo, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    async with server:
        async with client.ws_connect("/v1/forward", params={"port": str(port)}, headers=AUTH) as ws:
            assert agent.people.counts()["forward"] == 1
            payload = os.urandom(200_000).hex()
            await ws.send_bytes(payload.encode())
            got = b""
            while len(got) < len(payload):
                got += (await ws.receive(timeout=10)).data
            assert got == payload.upper().encode()
        nobody = free_port()
        resp = await client.get("/v1/forward", params={"port": str(nobody)}, headers=AUTH)
        assert resp.status == 502
        assert f"cannot connect to 127.0.0.1:{nobody} on this machine" in (await resp.json())["error"]
        resp = await client.get("/v1/forward", params={"port": "0"}, headers=AUTH)
        assert resp.status == 400
