"""Presence (people count as activity, once more after they leave) and filestream's refusals: a peer that sends a
path climbing out of the destination, or bytes that do not match their sha256, writes nothing under a real name.
The file streams run over a real aiohttp websocket."""

from __future__ import annotations

import hashlib
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from rawvm_agent.filestream import TransferError, receive_and_answer, send_tree
from rawvm_agent.presence import Presence
from rawvm_agent.wsframes import send_json


def test_presence_is_busy_while_held_and_once_after() -> None:
    changes: list[int] = []
    people = Presence(lambda: changes.append(1))
    assert not people.busy()
    with people.hold("shell"):
        assert people.busy() and people.busy()
        assert people.counts() == {"shell": 1, "forward": 0, "files": 0, "sync": 0}
    assert people.busy()  # the session that just closed is witnessed once...
    assert not people.busy()  # ...then the idle clock may start
    assert len(changes) == 2


Peer = Callable[[web.WebSocketResponse], Awaitable[None]]


async def _receive_from(peer: Peer, dest: Path, *, into_dir: bool = False) -> tuple[Any, Any]:
    """Run ``peer`` as the sending side of a real websocket; receive into ``dest``: (totals or error, verdict)."""
    verdicts: list[Any] = []

    async def handler(request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        await peer(ws)
        message = await ws.receive()
        verdicts.append(message.json() if message.type.name == "TEXT" else None)
        await ws.close()
        return ws

    app = web.Application()
    app.router.add_get("/", handler)
    async with TestClient(TestServer(app)) as client, client.ws_connect("/") as ws:
        try:
            outcome: Any = await receive_and_answer(ws, dest, into_dir=into_dir)
        except TransferError as exc:
            outcome = exc
    return outcome, verdicts[0] if verdicts else None


@pytest.mark.parametrize("bad", ["../escaped", "/etc/escaped", "a/../../escaped"])
async def test_a_path_out_of_the_destination_is_refused(tmp_path: Path, bad: str) -> None:
    dest = tmp_path / "dest"

    async def hostile(ws: web.WebSocketResponse) -> None:
        await send_json(ws, {"root": "dir", "name": "d", "contents": True})
        await send_json(ws, {"file": bad, "mode": 0o644, "size": 1})
        await ws.send_bytes(b"x")
        await send_json(ws, {"sha256": hashlib.sha256(b"x").hexdigest()})
        await send_json(ws, {"end": True})

    outcome, verdict = await _receive_from(hostile, dest)
    assert isinstance(outcome, TransferError) and "refusing the path" in str(outcome)
    assert "refusing the path" in verdict["error"]
    assert not (tmp_path / "escaped").exists() and not Path("/etc/escaped").exists()


async def test_damaged_bytes_leave_no_file(tmp_path: Path) -> None:
    async def damaged(ws: web.WebSocketResponse) -> None:
        await send_json(ws, {"root": "file", "name": "f.bin"})
        await send_json(ws, {"file": "", "mode": 0o600, "size": 4})
        await ws.send_bytes(b"abcd")
        await send_json(ws, {"sha256": hashlib.sha256(b"abce").hexdigest()})
        await send_json(ws, {"end": True})

    outcome, verdict = await _receive_from(damaged, tmp_path, into_dir=True)
    assert isinstance(outcome, TransferError) and "sha256 mismatch" in str(outcome)
    assert "sha256 mismatch" in verdict["error"]
    assert list(tmp_path.iterdir()) == []  # neither f.bin nor its partial file


async def test_a_tree_goes_both_ways_with_its_modes(tmp_path: Path) -> None:
    source = tmp_path / "src"
    (source / "sub" / "empty").mkdir(parents=True)
    (source / "run.sh").write_bytes(b"#!/bin/sh\n")
    (source / "run.sh").chmod(0o750)
    (source / "sub" / "data").write_bytes(bytes(range(256)) * 9000)  # over two 1 MiB messages

    async def sender(ws: web.WebSocketResponse) -> None:
        await send_tree(ws, source)

    outcome, verdict = await _receive_from(sender, tmp_path / "dest")
    assert (outcome.files, outcome.bytes) == (2, 10 + 256 * 9000)
    assert verdict == {"ok": True, "files": 2, "bytes": 10 + 256 * 9000}
    copied = tmp_path / "dest"
    assert (copied / "sub" / "data").read_bytes() == (source / "sub" / "data").read_bytes()
    assert (copied / "run.sh").stat().st_mode & 0o777 == 0o750
    assert (copied / "sub" / "empty").is_dir()
