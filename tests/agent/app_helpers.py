"""For the in-process agent tests: a real Agent behind aiohttp's test server (the fixture is ``serve_agent`` in
tests/agent/conftest.py)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp.test_utils import TestClient
from rawvm_agent.app import Agent

from tests.agent.core_helpers import TOKEN

AUTH = {"Authorization": f"Bearer {TOKEN}"}
ServeAgent = Callable[[dict[str, Any]], Awaitable[tuple[Agent, TestClient[Any, Any]]]]


async def get_json(client: TestClient[Any, Any], path: str) -> dict[str, Any]:
    """GET ``path`` with the agent's token; it must answer 200 with a JSON object."""
    resp = await client.get(path, headers=AUTH)
    assert resp.status == 200
    body: dict[str, Any] = await resp.json()
    return body
