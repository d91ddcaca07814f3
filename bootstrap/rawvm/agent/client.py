"""The one client for the agent API (Contract 4 in docs/architecture.md), over aiohttp with the bearer token.

Every laptop-side caller (the front door, ``rawvm top``, ``rawvm report``, batches, functions, Dask) talks to
agents through ``AgentClient.for_cluster``, on a session made by ``agent_session``. The bearer header and the
``ssl=`` argument of a request are built here and nowhere else, so a change to how the laptop authenticates to an
agent (or checks the agent's certificate) is made in this module alone.

The channel is mutual TLS only: the cluster record gives the context (the cluster CA pinned, no host name
checked, the laptop's client certificate presented; ``rawvm.agent.tls``), and a plain ``http://`` URL is
refused before any byte, with the token, is sent.
"""

from __future__ import annotations

import asyncio
import contextlib
import json as jsonlib
import ssl
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Protocol, TypeAlias, TypedDict, Unpack

import aiohttp
from multidict import CIMultiDictProxy
from rawvm_agent.wsframes import HEARTBEAT_S, MAX_MESSAGE_BYTES

from rawvm.errors import RawvmError

TERMINAL_TASK_STATES = frozenset({"exited", "failed", "killed", "interrupted", "lost", "done", "cancelled"})
HEALTHZ_TIMEOUT_S = 5.0
CALLS_TIMEOUT_S = 120.0  # one batch of calls: the agent reads up to 64 MiB before it answers
RESULTS_GRACE_S = 30.0  # a results long poll may take this much longer than the wait it asked for
FOLLOW_CONNECT_TIMEOUT_S = 10.0
ENVIRONMENT_TIMEOUT_S = 1800.0  # installing a changed lock's difference (uv downloads, maybe builds)

# Callers hold sessions under this name, so none of them needs aiohttp's types.
AgentSession: TypeAlias = aiohttp.ClientSession
AgentWebSocket: TypeAlias = aiohttp.ClientWebSocketResponse  # a person's session: rawvm shell, cp, forward


def agent_session(*, connections: int = 100, per_host: int = 0, keepalive_s: float = 15.0) -> AgentSession:
    """A session for agent clients to share: at most ``connections`` open at once, ``per_host`` to one agent
    (0: no limit), idle ones kept ``keepalive_s``. The defaults are aiohttp's own."""
    connector = aiohttp.TCPConnector(limit=connections, limit_per_host=per_host, keepalive_timeout=keepalive_s)
    return aiohttp.ClientSession(connector=connector)


class AgentError(RawvmError):
    """The agent answered with an error, or could not be reached."""

    def __init__(self, message: str, *, status: int | None = None, reason: str = "", no_answer: str = "") -> None:
        super().__init__(message)
        self.status = status  # the HTTP status of the agent's error answer; None when no answer came
        self.reason = reason or message  # the agent's error text or the transport's words, without the context
        self.no_answer = no_answer  # why no answer came, in a few words ("timed out"); "" if unknown or answered


@dataclass(frozen=True)
class _Answer:
    status: int
    body: bytes
    headers: CIMultiDictProxy[str]

    def json(self) -> Any:
        """The body as JSON (None when empty, as aiohttp reads it); a ValueError when it is not JSON."""
        return jsonlib.loads(self.body) if self.body.strip() else None

    def error_text(self) -> str:
        """The agent's ``{"error": ...}`` text of an error answer, "" when it has none."""
        with contextlib.suppress(ValueError):
            body = self.json()
            if isinstance(body, dict):
                return str(body.get("error", ""))
        return ""


def _why_no_answer(exc: BaseException) -> str:
    """A few words on a transport failure, as ``rawvm top`` shows them."""
    if isinstance(exc, TimeoutError):
        return "timed out"
    if isinstance(exc, aiohttp.ClientConnectorError):
        return "connection refused" if "refused" in str(exc).lower() else ""
    return type(exc).__name__


class ClusterChannel(Protocol):
    """What a client needs of a cluster record (``rawvm.clusters.ClusterRecord``): its token and TLS context."""

    @property
    def token(self) -> str: ...

    def agent_ssl_context(self) -> ssl.SSLContext: ...


class RequestOptions(TypedDict, total=False):
    """What one request to the agent may carry besides its method and path."""

    params: Mapping[str, str] | None
    json: Any
    data: bytes | None
    accept: str  # an Accept header ("": none)
    timeout: aiohttp.ClientTimeout | None  # None: the client's own


class AgentClient:
    """One agent. Use ``async with AgentClient.for_cluster(record, url) as agent: ...``, or pass a shared
    ``agent_session()``."""

    def __init__(
        self,
        base_url: str,
        token: str,
        *,
        ssl_context: ssl.SSLContext,
        session: AgentSession | None = None,
        timeout: float = 30.0,
        connect_timeout: float | None = None,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self._token = token
        self._session = session
        self._own_session = session is None
        self._timeout = aiohttp.ClientTimeout(total=timeout, sock_connect=connect_timeout)
        self._ssl = ssl_context
        # Set: every request fails with this line before anything, the token least of all, is sent. Refused
        # lazily, so a caller that falls back on an unreachable agent (``rawvm logs`` on the sink) still does.
        self.refusal = ""
        if base_url and not base_url.startswith("https://"):  # "": no address yet, a request fails as unreachable
            self.refusal = f"refusing the agent URL {base_url!r}: agents are reached over mutual TLS (https://) only"

    @classmethod
    def for_cluster(
        cls,
        record: ClusterChannel,
        url: str,
        *,
        session: AgentSession | None = None,
        timeout: float = 30.0,
        connect_timeout: float | None = None,
    ) -> AgentClient:
        """The client of the agent at ``url`` of cluster ``record``: its token, its pinned channel. A record without
        its channel's files gets a client whose every request fails with the record's refusal (so callers that
        fall back on an unreachable agent, as ``rawvm logs`` on the sink, still do); its context trusts nothing."""
        try:
            context, refusal = record.agent_ssl_context(), ""
        except RawvmError as exc:
            context, refusal = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT), str(exc)
        client = cls(
            url, record.token, ssl_context=context, session=session, timeout=timeout, connect_timeout=connect_timeout
        )
        client.refusal = refusal or client.refusal  # an old record: say why, before the URL
        return client

    async def __aenter__(self) -> AgentClient:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    async def close(self) -> None:
        """Close the session if this client made it (a shared one stays open)."""
        if self._own_session and self._session is not None:
            await self._session.close()
            self._session = None

    # -- the transport: the only code that builds a request ---------------------------------------------------

    def _get_session(self) -> AgentSession:
        if self._session is None:
            self._session = agent_session()
        return self._session

    @contextlib.asynccontextmanager
    async def _open(
        self, method: str, path: str, *, authorized: bool = True, **options: Unpack[RequestOptions]
    ) -> AsyncIterator[aiohttp.ClientResponse]:
        """The request's response, open for reading; ``/healthz`` goes without the token."""
        if self.refusal:
            raise AgentError(self.refusal, reason=self.refusal, no_answer="no TLS channel")
        headers = {"Authorization": f"Bearer {self._token}"} if authorized else {}
        if accept := options.get("accept", ""):
            headers["Accept"] = accept
        async with self._get_session().request(
            method,
            self.base_url + path,
            params=options.get("params"),
            json=options.get("json"),
            data=options.get("data"),
            headers=headers,
            timeout=options.get("timeout") or self._timeout,
            ssl=self._ssl,
        ) as resp:
            yield resp

    @contextlib.asynccontextmanager
    async def websocket(self, path: str, *, params: Mapping[str, str] | None = None) -> AsyncIterator[AgentWebSocket]:
        """A websocket to one of the agent's session routes (``rawvm_agent.interactive_api``), on the same pinned
        mutual-TLS channel and token as every request; its heartbeat notices an agent that went away."""
        if self.refusal:
            raise AgentError(self.refusal, reason=self.refusal, no_answer="no TLS channel")
        try:
            ws = await self._get_session().ws_connect(
                self.base_url + path,
                params=params,
                headers={"Authorization": f"Bearer {self._token}"},
                ssl=self._ssl,
                heartbeat=HEARTBEAT_S,
                max_msg_size=MAX_MESSAGE_BYTES,
                timeout=aiohttp.ClientWSTimeout(ws_close=10.0),
            )
        except aiohttp.WSServerHandshakeError as exc:
            raise AgentError(f"{path} on {self.base_url}: HTTP {exc.status}", status=exc.status) from None
        except (TimeoutError, aiohttp.ClientError) as exc:
            raise self._unreachable(exc) from None
        try:
            yield ws
        finally:
            await ws.close()

    def _unreachable(self, exc: BaseException) -> AgentError:
        words = str(exc) or type(exc).__name__
        return AgentError(
            f"cannot reach the agent at {self.base_url}: {words}", reason=words, no_answer=_why_no_answer(exc)
        )

    async def _exchange(self, method: str, path: str, **options: Unpack[RequestOptions]) -> _Answer:
        """One request with its whole answer read, whatever its status; no answer raises AgentError."""
        try:
            async with self._open(method, path, **options) as resp:
                return _Answer(resp.status, await resp.read(), resp.headers)
        except (TimeoutError, aiohttp.ClientError) as exc:
            raise self._unreachable(exc) from None

    def _failed(self, what: str, answer: _Answer, *, detail: bool = False) -> AgentError:
        """An AgentError for an error answer: ``<what>: HTTP <status>``, with the agent's text if ``detail``."""
        text = answer.error_text() if detail else ""
        message = f"{what}: HTTP {answer.status} {text}".rstrip()
        return AgentError(message, status=answer.status, reason=text or f"HTTP {answer.status}")

    async def _request(
        self, method: str, path: str, *, json: Any = None, params: Mapping[str, str] | None = None
    ) -> Any:
        """A JSON route: its decoded answer; an error status raises AgentError (a body that is not JSON, ValueError)."""
        answer = await self._exchange(method, path, json=json, params=params)
        if answer.status == 401:
            raise AgentError(f"the agent at {self.base_url} refused the token (401)", status=401)
        if answer.status >= 400:
            raise self._failed(f"{method} {path} on {self.base_url}", answer, detail=True)
        return answer.json()

    # -- health and state ---------------------------------------------------------------------------------------

    async def healthz(self) -> bool:
        """True when the agent answers; never raises."""
        try:
            timeout = aiohttp.ClientTimeout(total=HEALTHZ_TIMEOUT_S)
            async with self._open("GET", "/healthz", timeout=timeout, authorized=False) as resp:
                return resp.status == 200
        except (TimeoutError, aiohttp.ClientError, AgentError):
            return False

    async def status(self, *, changed_from: str = "", wait: float = 0.0) -> dict[str, Any]:
        """The agent's phase, idle clock and task counts (``GET /v1/status``). With ``changed_from`` and ``wait``:
        the agent answers once its phase is no longer ``changed_from``, or after ``wait`` seconds (at most 10)."""
        params = {"phase": changed_from, "wait": f"{wait:g}"} if changed_from and wait > 0 else None
        body: dict[str, Any] = await self._request("GET", "/v1/status", params=params)
        return body

    async def keepalive(self) -> None:
        """Count as activity now: the idle clock starts again."""
        await self._request("POST", "/v1/keepalive")

    async def shutdown(self) -> None:
        """Ask the agent to flush to the sink and stop its machine."""
        await self._request("POST", "/v1/shutdown")

    async def hand_sink(self, url: str, fields: Mapping[str, str]) -> None:
        """Give the agent its own sink upload form (``PUT /v1/sink``): a presigned POST for this machine's keys.
        The form is as good as a credential until it expires: it travels only in this request's body."""
        await self._request("PUT", "/v1/sink", json={"url": url, "fields": dict(fields)})

    # -- telemetry ----------------------------------------------------------------------------------------------

    async def samples(self, *, after: int = -1, limit: int = 1) -> list[dict[str, Any]]:
        """Telemetry samples after ``after`` (JSON); reading them is never activity."""
        try:
            answer = await self._exchange(
                "GET",
                "/v1/samples",
                params={"after": str(after), "limit": str(limit)},
                accept="application/json",
            )
            if answer.status >= 400:
                raise self._failed(f"samples on {self.base_url}", answer)
            body: list[dict[str, Any]] = answer.json()
            return body
        except ValueError as exc:
            raise self._unreachable(exc) from None

    async def packed_samples(self, *, after: int = -1, limit: int = 3600, newest: bool = False) -> bytes:
        """Up to ``limit`` samples after seq ``after`` as the agent packs them (a msgpack list), the last ones
        with ``newest``; reading them is never activity."""
        params = {"after": str(after), "limit": str(limit)}
        if newest:
            params["newest"] = "1"
        answer = await self._exchange("GET", "/v1/samples", params=params)
        if answer.status >= 400:
            raise self._failed(f"samples on {self.base_url}", answer)
        return answer.body

    # -- tasks ----------------------------------------------------------------------------------------------------

    async def submit(
        self,
        argv: Sequence[str],
        *,
        env: Mapping[str, str] | None = None,
        cwd: str = "",
        secret_env: Sequence[str] = (),
    ) -> str:
        """Start a task; its id."""
        body = {"argv": list(argv), "env": dict(env or {}), "cwd": cwd, "secret_env": list(secret_env)}
        answer = await self._request("POST", "/v1/tasks", json=body)
        return str(answer["id"])

    async def task(self, task_id: str) -> dict[str, Any]:
        """One task's record."""
        body: dict[str, Any] = await self._request("GET", f"/v1/tasks/{task_id}")
        return body

    async def tasks(self) -> list[dict[str, Any]]:
        """Every task's record."""
        body: list[dict[str, Any]] = await self._request("GET", "/v1/tasks")
        return body

    async def wait_task(self, task_id: str, *, poll: float = 0.5) -> dict[str, Any]:
        """The task's record once it has ended."""
        while True:
            record = await self.task(task_id)
            if record.get("state") in TERMINAL_TASK_STATES or record.get("exit_code") is not None:
                return record
            await asyncio.sleep(poll)

    async def cancel_task(self, task_id: str, *, grace: float = 5.0) -> dict[str, Any]:
        """End a task (``POST /v1/tasks/{id}/cancel``): SIGTERM to its process group, SIGKILL after ``grace``; its
        record once it has ended. Its output stays readable."""
        timeout = aiohttp.ClientTimeout(total=2 * grace + 30.0)
        answer = await self._exchange(
            "POST", f"/v1/tasks/{task_id}/cancel", params={"grace": str(grace)}, timeout=timeout
        )
        if answer.status >= 400:
            raise self._failed(f"cancel of task {task_id} on {self.base_url}", answer, detail=True)
        body: dict[str, Any] = answer.json()
        return body

    async def logs(self, task_id: str, *, stream: str = "stdout", offset: int = 0) -> tuple[bytes, int]:
        """What the task wrote to ``stream`` from ``offset`` (one page), and the next offset."""
        params = {"stream": stream, "offset": str(offset)}
        answer = await self._exchange("GET", f"/v1/tasks/{task_id}/logs", params=params)
        if answer.status >= 400:
            raise self._failed(f"logs of task {task_id} on {self.base_url}", answer)
        return answer.body, int(answer.headers.get("X-Next-Offset", offset + len(answer.body)))

    async def follow_logs(self, task_id: str, *, stream: str = "stdout", offset: int = 0) -> AsyncIterator[bytes]:
        """Yield the task's output as it comes until the task ends; reconnects from the last offset if the
        connection drops while the task still runs."""
        position = offset
        failures = 0
        while True:
            try:
                async with self._open(
                    "GET",
                    f"/v1/tasks/{task_id}/logs",
                    params={"stream": stream, "offset": str(position), "follow": "1"},
                    timeout=aiohttp.ClientTimeout(total=None, sock_connect=FOLLOW_CONNECT_TIMEOUT_S),
                ) as resp:
                    if resp.status >= 400:
                        raise AgentError(
                            f"logs of task {task_id} on {self.base_url}: HTTP {resp.status}", status=resp.status
                        )
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

    async def set_env(self, env: Mapping[str, str], secret_env: Sequence[str] = ()) -> None:
        """Variables every later task on the machine sees (``PUT /v1/env``); ``secret_env`` names the secrets
        among them, masked in the machine's logs. Only this request's body carries them."""
        await self._request("PUT", "/v1/env", json={"env": dict(env), "secret_env": list(secret_env)})

    # -- code on a warm machine (rawvm_agent.code_sync) -----------------------------------------------------------

    async def code_state(self) -> dict[str, Any]:
        """What the machine holds: ``files`` (``{path: sha256}`` of the project files it last received), and its
        bundle's environment ``fingerprint``, ``locks`` and ``target``."""
        body: dict[str, Any] = await self._request("GET", "/v1/code")
        return body or {}

    async def code_files(self) -> dict[str, str]:
        """``{path: sha256}`` of the project files the machine last received."""
        return {str(k): str(v) for k, v in (await self.code_state()).get("files", {}).items()}

    async def send_environment(self, archive: bytes) -> int:
        """Install the difference a newer lock makes (a tar.gz of a bundle without its code); packages locked."""
        answer = await self._exchange(
            "POST", "/v1/environment", data=archive, timeout=aiohttp.ClientTimeout(total=ENVIRONMENT_TIMEOUT_S)
        )
        if answer.status >= 400:
            raise self._failed(f"update the environment on {self.base_url}", answer, detail=True)
        return int((answer.json() or {}).get("packages") or 0)

    async def send_code(self, archive: bytes) -> None:
        """Unpack a tar.gz of project files over the machine's work dir."""
        answer = await self._exchange(
            "POST", "/v1/code", data=archive, timeout=aiohttp.ClientTimeout(total=CALLS_TIMEOUT_S)
        )
        if answer.status >= 400:
            raise self._failed(f"sync code to {self.base_url}", answer, detail=True)

    # -- batches (rawvm_agent.batch_api) ----------------------------------------------------------------------

    async def batch_status(self) -> dict[str, Any]:
        """This machine's batch: its share index, queued and running ids, or the error that stopped it."""
        body: dict[str, Any] = await self._request("GET", "/v1/batch")
        return body

    async def batch_results(self, after: int = 0) -> dict[str, Any]:
        """Final results from the ``after``-th on: ``{"results": [...], "next": N}``."""
        body: dict[str, Any] = await self._request("GET", "/v1/batch/results", params={"after": str(after)})
        return body

    async def batch_share(self, index: int) -> None:
        """Give a machine without one its share of the batch."""
        await self._request("POST", "/v1/batch/share", json={"index": index})

    async def batch_cancel(self, *, grace: float = 5.0) -> dict[str, Any]:
        """Stop this machine's share of the batch: queued ids never start, running tasks are cancelled."""
        timeout = aiohttp.ClientTimeout(total=grace + 30.0)
        answer = await self._exchange("POST", "/v1/batch/cancel", params={"grace": str(grace)}, timeout=timeout)
        if answer.status >= 400:
            raise self._failed(f"cancel the batch on {self.base_url}", answer, detail=True)
        body: dict[str, Any] = answer.json()
        return body

    async def batch_adopt(self, ids: Sequence[int]) -> list[int]:
        """Hand the machine ids of a dead one; those it took."""
        body = await self._request("POST", "/v1/batch/adopt", json={"ids": list(ids)})
        return [int(i) for i in body.get("adopted", [])]

    # -- function calls (rawvm_agent.calls) ---------------------------------------------------------------------

    async def submit_calls(self, client: str, packed: bytes, *, slots: int) -> int:
        """Queue packed calls (``rawvm_agent.call_worker.pack``) for ``client``; how many workers the machine runs
        (0: not said). A refusal raises AgentError with the status: 429 means the queue is full for now."""
        answer = await self._exchange(
            "POST",
            "/v1/calls",
            params={"client": client, "slots": str(slots)},
            data=packed,
            timeout=aiohttp.ClientTimeout(total=CALLS_TIMEOUT_S),
        )
        if answer.status != 202:
            raise self._failed(f"calls on {self.base_url}", answer, detail=True)
        body = answer.json()  # a 202 that is not JSON is a broken agent: the ValueError says so
        return int((body or {}).get("workers") or 0)

    async def cancel_calls(self, client: str) -> None:
        """Drop ``client``'s queued calls and stop the workers running its calls."""
        await self._request("POST", "/v1/calls/cancel", params={"client": client})

    async def call_results(self, client: str, *, wait: float) -> bytes:
        """``client``'s finished calls, packed (``rawvm_agent.call_worker.unpack``); the agent holds the request up
        to ``wait`` seconds for the first one."""
        answer = await self._exchange(
            "GET",
            "/v1/calls/results",
            params={"client": client, "wait": str(wait)},
            timeout=aiohttp.ClientTimeout(total=wait + RESULTS_GRACE_S),
        )
        if answer.status != 200:
            raise self._failed(f"call results on {self.base_url}", answer)
        return answer.body
