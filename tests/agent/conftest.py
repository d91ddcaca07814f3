"""Shared fixtures of the in-process agent tests."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer
from rawvm_agent.app import Agent
from rawvm_agent.config import config_from_dict
from rawvm_agent.server import create_app

from tests.agent.app_helpers import ServeAgent


@pytest.fixture
async def serve_agent() -> AsyncIterator[ServeAgent]:
    """Starts a real Agent from a raw agent config behind an in-process aiohttp test server; every client it
    started is closed at teardown."""
    clients: list[TestClient[Any, Any]] = []

    async def serve(raw: dict[str, Any]) -> tuple[Agent, TestClient[Any, Any]]:
        agent = Agent(config_from_dict(raw))
        client = TestClient(TestServer(create_app(agent)))
        await client.start_server()
        clients.append(client)
        return agent, client

    yield serve
    for client in clients:
        await client.close()
