"""A client for the agent API (Contract 4 in docs/architecture.md), over aiohttp with the bearer token."""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import AsyncIterator, Mapping, Sequence
from types import TracebackType
from typing import Any

import aiohttp

from rawvm.errors import RawvmError

TERMINAL_TASK_STATES = frozenset({"exited", "failed", "killed", "interrupted", "lost", "done"})


class AgentError(RawvmError):
    """The agent answered with an error, or could not be reached."""


class AgentClient:
    """One agent. Use ``async with AgentClient(url, token) as agent: ...`` or pass a shared session."""

    def __init__(
        self,
        base_url: str,
        token: str,
        *,
        session: aiohttp.ClientSession | None = None,
        timeout: float = 30.0,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self._headers = {"Authorization": f"Bearer {token}"}
        self._session = session
        self._own_session = session is None
        self._timeout = aiohttp.ClientTimeout(total=timeout)
        self._ssl: ssl.SSLContext | bool = ssl_context if ssl_context is not None else True

    async def __aenter__(self) -> AgentClient:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    async def close(self) -> None:
        if self._own_session and self._session is not None:
            await self._session.close()
            self._session = None

    def _get_session(self) -> aiohttp.ClientSession:
        if self._session is None:
            self._session = aiohttp.ClientSession()
        return self._session

    async def _request(
        self, method: str, path: str, *, json: Any = None, params: Mapping[str, str] | None = None
    ) -> Any:
        url = self.base_url + path
        try:
            async with self._get_session().request(
                method, url, json=json, params=params, headers=self._headers, timeout=self._timeout, ssl=self._ssl
            ) as resp:
                if resp.status == 401:
                    raise AgentError(f"the agent at {self.base_url} refused the token (401)")
                body = await resp.json(content_type=None) if resp.content_length != 0 else None
                if resp.status >= 400:
                    detail = body.get("error", "") if isinstance(body, dict) else ""
                    raise AgentError(f"{method} {path} on {self.base_url}: HTTP {resp.status} {detail}".rstrip())
                return body
        except (TimeoutError, aiohttp.ClientError) as exc:
            raise AgentError(f"cannot reach the agent at {self.base_url}: {exc or type(exc).__name__}") from None

    async def healthz(self) -> bool:
        """True when the agent answers; never raises."""
        try:
            async with self._get_session().get(
                self.base_url + "/healthz", timeout=aiohttp.ClientTimeout(total=5), ssl=self._ssl
            ) as resp:
                return resp.status == 200
        except (TimeoutError, aiohttp.ClientError):
            return False

    async def status(self) -> dict[str, Any]:
        body: dict[str, Any] = await self._request("GET", "/v1/status")
        return body

    async def submit(
        self,
        argv: Sequence[str],
        *,
        env: Mapping[str, str] | None = None,
        cwd: str = "",
        secret_env: Sequence[str] = (),
    ) -> str:
        body = {"argv": list(argv), "env": dict(env or {}), "cwd": cwd, "secret_env": list(secret_env)}
        answer = await self._request("POST", "/v1/tasks", json=body)
        return str(answer["id"])

    async def task(self, task_id: str) -> dict[str, Any]:
        body: dict[str, Any] = await self._request("GET", f"/v1/tasks/{task_id}")
        return body

    async def tasks(self) -> list[dict[str, Any]]:
        body: list[dict[str, Any]] = await self._request("GET", "/v1/tasks")
        return body

    async def samples(self, *, after: int = -1, limit: int = 1) -> list[dict[str, Any]]:
        """Telemetry samples after ``after`` (JSON); reading them is never activity."""
        url = f"{self.base_url}/v1/samples"
        headers = {**self._headers, "Accept": "application/json"}
        try:
            async with self._get_session().get(
                url,
                params={"after": str(after), "limit": str(limit)},
                headers=headers,
                timeout=self._timeout,
                ssl=self._ssl,
            ) as resp:
                if resp.status >= 400:
                    raise AgentError(f"samples on {self.base_url}: HTTP {resp.status}")
                body: list[dict[str, Any]] = await resp.json(content_type=None)
                return body
        except (TimeoutError, aiohttp.ClientError, ValueError) as exc:
            raise AgentError(f"cannot reach the agent at {self.base_url}: {exc or type(exc).__name__}") from None

    async def keepalive(self) -> None:
        await self._request("POST", "/v1/keepalive")

    async def shutdown(self) -> None:
        await self._request("POST", "/v1/shutdown")

    async def logs(self, task_id: str, *, stream: str = "stdout", offset: int = 0) -> tuple[bytes, int]:
        """What the task wrote to ``stream`` from ``offset`` (one page), and the next offset."""
        params = {"stream": stream, "offset": str(offset)}
        try:
            async with self._get_session().get(
                f"{self.base_url}/v1/tasks/{task_id}/logs",
                params=params,
                headers=self._headers,
                timeout=self._timeout,
                ssl=self._ssl,
            ) as resp:
                if resp.status >= 400:
                    raise AgentError(f"logs of task {task_id} on {self.base_url}: HTTP {resp.status}")
                data = await resp.read()
                return data, int(resp.headers.get("X-Next-Offset", offset + len(data)))
        except (TimeoutError, aiohttp.ClientError) as exc:
            raise AgentError(f"cannot reach the agent at {self.base_url}: {exc or type(exc).__name__}") from None

    async def follow_logs(self, task_id: str, *, stream: str = "stdout", offset: int = 0) -> AsyncIterator[bytes]:
        """Yield the task's output as it comes until the task ends; reconnects from the last offset if the
        connection drops while the task still runs."""
        position = offset
        failures = 0
        while True:
            try:
                async with self._get_session().get(
                    f"{self.base_url}/v1/tasks/{task_id}/logs",
                    params={"stream": stream, "offset": str(position), "follow": "1"},
                    headers=self._headers,
                    timeout=aiohttp.ClientTimeout(total=None, sock_connect=10),
                    ssl=self._ssl,
                ) as resp:
                    if resp.status >= 400:
                        raise AgentError(f"logs of task {task_id} on {self.base_url}: HTTP {resp.status}")
                    async for chunk in resp.content.iter_any():
                        position += len(chunk)
                        failures = 0
                        yield chunk
                return  # the agent ends the stream when the task has ended and its output is drained
            except (TimeoutError, aiohttp.ClientError) as exc:
                failures += 1
                if failures > 5:
                    raise AgentError(f"lost the log stream of task {task_id} on {self.base_url}: {exc}") from None
                await asyncio.sleep(min(2.0**failures / 4, 5.0))

    async def wait_task(self, task_id: str, *, poll: float = 0.5) -> dict[str, Any]:
        """The task's record once it has ended."""
        while True:
            record = await self.task(task_id)
            if record.get("state") in TERMINAL_TASK_STATES or record.get("exit_code") is not None:
                return record
            await asyncio.sleep(poll)
