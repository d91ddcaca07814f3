"""``GET /v1/sync`` on a real in-process Agent: the work dir listed as synctree lists it, deletes kept inside it,
the session counted as presence, and its owned task (the notebook server) cancelled when the laptop goes."""

from __future__ import annotations

import asyncio
import hashlib
import json
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp
from rawvm_agent import synctree
from rawvm_agent.interactive_api import machine_path

from tests.agent.app_helpers import AUTH, ServeAgent
from tests.agent.core_helpers import agent_config


async def _ask(ws: aiohttp.ClientWebSocketResponse, message: dict[str, Any]) -> dict[str, Any]:
    await ws.send_str(json.dumps(message))
    answer: dict[str, Any] = json.loads((await ws.receive(timeout=10)).data)
    return answer


def test_scan_skips_what_is_not_the_project(tmp_path: Path) -> None:
    (tmp_path / "a.py").write_text("x = 1\n")
    for skipped in (".git/HEAD", "__pycache__/a.pyc", ".ipynb_checkpoints/n-checkpoint.ipynb", "env/pyvenv.cfg"):
        (tmp_path / skipped).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / skipped).write_text("skip")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "n.ipynb").write_text("{}")
    (tmp_path / "sub" / ".n.ipynb.rawvm-partial-00ff").write_text("half")
    found = synctree.scan(tmp_path, synctree.HashCache())
    assert sorted(found) == ["a.py", "sub/n.ipynb"]
    assert found["a.py"].sha256 == hashlib.sha256(b"x = 1\n").hexdigest()
    assert synctree.safe_relative(tmp_path, "../x") is None
    assert synctree.safe_relative(tmp_path, "/etc/passwd") is None
    assert synctree.safe_relative(tmp_path, ".git/config") is None
    assert synctree.safe_relative(tmp_path, "sub/n.ipynb") == tmp_path / "sub" / "n.ipynb"


async def test_list_delete_presence_and_the_owned_task_ends_with_the_session(
    serve_agent: ServeAgent, tmp_path: Path
) -> None:
    agent, client = await serve_agent(agent_config(tmp_path / "state"))
    root = machine_path(agent, ".")  # the work dir, as the route sees it
    root.mkdir(parents=True, exist_ok=True)
    (root / "notes.txt").write_text("hello")
    resp = await client.post(
        "/v1/tasks", json={"argv": [sys.executable, "-c", "import time; time.sleep(600)"]}, headers=AUTH
    )
    task_id = str((await resp.json())["id"])
    ws = await client.ws_connect("/v1/sync", headers=AUTH)
    await ws.send_str(json.dumps({"owns": task_id}))
    listed = await _ask(ws, {"list": True})
    assert listed["files"]["notes.txt"][0] == 5
    assert listed["files"]["notes.txt"][2] == hashlib.sha256(b"hello").hexdigest()
    assert agent.people.counts()["sync"] == 1 and agent.people.busy()
    assert await _ask(ws, {"delete": "../outside"}) == {"error": "refusing to delete '../outside'"}
    assert await _ask(ws, {"delete": "notes.txt"}) == {"deleted": "notes.txt"}
    assert not (root / "notes.txt").exists()
    assert agent.tasks.get(task_id) is not None and agent.tasks.get(task_id).record.state == "running"  # type: ignore[union-attr]
    await ws.close()
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline and (agent.people.counts()["sync"] or not agent.tasks.get(task_id).done.is_set()):  # type: ignore[union-attr]
        await asyncio.sleep(0.1)
    assert agent.people.counts()["sync"] == 0
    record = await (await client.get(f"/v1/tasks/{task_id}", headers=AUTH)).json()
    assert record["state"] == "cancelled", record
