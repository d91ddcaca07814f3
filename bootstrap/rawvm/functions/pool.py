"""The machinery under ``@rawvm.function``: warm machines per environment, and calls spread over them.

Everything asynchronous runs on one private event loop in a daemon thread, so the API works the same from a
plain script and from Jupyter (whose thread already runs a loop). Callers get ``concurrent.futures`` futures.

A ``Pool`` is one cluster for one reuse key: the scanned environment's fingerprint (what the resolver writes to
``[source] fingerprint``), the project's files, the extra requirements and the machine options. A later function
with the same key, in this process or (through ``$RAWVM_STATE_DIR/functions/<key>.json``) another one, reuses
the machines while they are warm: no lock, no boot. Calls go to the least-loaded machine, in batches, through
the agent's ``/v1/calls`` endpoints (agent/rawvm_agent/calls.py); one long poll per machine brings results back.
"""

from __future__ import annotations

import asyncio
import atexit
import collections
import concurrent.futures
import contextlib
import dataclasses
import hashlib
import json
import secrets
import shutil
import threading
import time
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from rawvm_agent.call_worker import pack, unpack

from rawvm import clusters
from rawvm.agent.client import AgentClient, AgentError, AgentSession, agent_session
from rawvm.errors import RawvmError
from rawvm.functions.results import RemoteError, RemoteTraceback, decode_result
from rawvm.launch import launch
from rawvm.options import LaunchOptions
from rawvm.session import ready_or_fail

T = TypeVar("T")

__all__ = [
    "Pool",
    "PoolOptions",
    "RemoteError",
    "RemoteTraceback",
    "decode_result",
    "forget",
    "on_loop",
    "pool_for",
    "reuse_key",
]

MAX_CALL_BYTES = 48 << 20  # one pickled call; the agent refuses requests over 64 MiB
MAX_BATCH_CALLS = 1024
MAX_BATCH_BYTES = 32 << 20
WINDOW_PER_WORKER = 1024  # calls in flight per worker slot: enough to hide the round trips of tiny calls
DEFAULT_WINDOW = 1024  # before a machine has said how many workers it runs
RESULTS_WAIT_S = 20.0
STATUS_TIMEOUT_S = 5.0  # a warm machine answers its status at once
QUEUE_FULL = 429  # the agent's answer to calls while its queue is full
RECHECK_AFTER_S = 2.0  # an unused pool's machines may have stopped: ask them before sending more
STOPPING_MARGIN_S = 5.0  # a machine about to stop for idleness is not worth sending to
KEPT_BUNDLES = 16  # locks kept for launching again: the newest, one per reuse key


# -- the private loop ---------------------------------------------------------------------------------------------

_loop_lock = threading.Lock()
_loop: asyncio.AbstractEventLoop | None = None


def background_loop() -> asyncio.AbstractEventLoop:
    global _loop
    with _loop_lock:
        if _loop is None:
            loop = asyncio.new_event_loop()
            threading.Thread(target=loop.run_forever, name="rawvm-function-loop", daemon=True).start()
            _loop = loop
            atexit.register(_close_all)
        return _loop


def on_loop(coro: Coroutine[Any, Any, T]) -> concurrent.futures.Future[T]:
    return asyncio.run_coroutine_threadsafe(coro, background_loop())


# -- the pool -----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PoolOptions:
    """What a function's machines are: the launch options, and how many calls each runs at once."""

    launch: LaunchOptions
    """Machines, lifetime and environment (``environment.extra_requirements`` holds what the lock adds)."""

    slots: int = 0
    """Concurrent calls per machine; 0: its cores."""


def reuse_key(options: PoolOptions, project_dir: Path) -> str:
    """Same key, same machines: the environment's fingerprint, the project's files, the options."""
    from rawvm_resolver.project import list_project_files
    from rawvm_resolver.scan import scan

    fingerprint = scan(options.launch.environment.source).fingerprint()
    project = list_project_files(project_dir)
    code = hashlib.sha256()
    for relative in project.files:
        code.update(relative.encode() + b"\0")
        with contextlib.suppress(OSError):
            code.update(hashlib.sha256((project.root / relative).read_bytes()).digest())
    chosen = {"launch": options.launch.to_json(), "slots": options.slots}
    payload = {"env": fingerprint, "code": code.hexdigest(), "root": str(project.root), "options": chosen}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:32]


def _key_path(key: str) -> Path:
    return clusters.state_dir() / "functions" / f"{key}.json"


def bundle_path(key: str) -> Path:
    """The lock of this key, kept: machines launched again for an unchanged key need no new lock."""
    path = clusters.state_dir() / "functions" / "bundles" / key
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    kept = sorted((p for p in path.parent.iterdir() if p.is_dir()), key=lambda p: p.stat().st_mtime, reverse=True)
    for old in kept[KEPT_BUNDLES:]:
        if old != path:
            shutil.rmtree(old, ignore_errors=True)
    return path


@dataclass
class _Call:
    id: int
    payload: bytes
    future: asyncio.Future[Any]


@dataclass
class _Machine:
    id: str
    url: str
    window: int = DEFAULT_WINDOW
    workers: int = 0  # call workers it runs, as its last answer said (0: not known yet)
    outbox: collections.deque[_Call] = field(default_factory=collections.deque)
    inflight: dict[int, _Call] = field(default_factory=dict)
    sending: bool = False
    polling: bool = False
    dead: str = ""  # why it is out of the pool

    @property
    def load(self) -> int:
        return len(self.outbox) + len(self.inflight)


class Pool:
    """One cluster's machines and the calls on them. Every method runs on the background loop."""

    def __init__(self, key: str, options: PoolOptions, project_dir: Path) -> None:
        self.key = key
        self.options = options
        self.project_dir = project_dir  # what code.tar.gz holds (the key covers its files)
        self.record: clusters.ClusterRecord | None = None
        self.machines: list[_Machine] = []
        self.backlog: collections.deque[_Call] = collections.deque()
        self.launches = 0
        self.client = secrets.token_hex(8)  # this process's results on the agents
        self._session: AgentSession | None = None
        self._next = 0
        self._ready_lock: asyncio.Lock | None = None
        self._last_used = 0.0
        self._loads: Callable[[bytes], Any] | None = None
        self._tasks: set[asyncio.Task[None]] = set()  # senders and pollers, kept referenced while they run

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # -- machines ---------------------------------------------------------------------------------------------

    @property
    def cluster(self) -> str:
        return self.record.name if self.record else ""

    def _http(self) -> AgentSession:
        if self._session is None:
            self._session = agent_session()
        return self._session

    def _agent(self, machine: _Machine) -> AgentClient:
        """The machine's agent on the pool's one session; its timeout is the status check's (the call routes
        carry their own)."""
        assert self.record is not None
        return AgentClient.for_cluster(self.record, machine.url, session=self._http(), timeout=STATUS_TIMEOUT_S)

    async def ensure(self) -> None:
        """Machines ready to take calls: the warm ones, or freshly launched ones."""
        if self._ready_lock is None:
            self._ready_lock = asyncio.Lock()
        async with self._ready_lock:
            live = [m for m in self.machines if not m.dead]
            if live and time.monotonic() - self._last_used < RECHECK_AFTER_S:
                return
            if self.record is None:
                self.record = self._recorded_cluster()
                if self.record is not None:
                    self.machines = [_Machine(m.id, m.agent_url) for m in self.record.machines]
            if self.record is not None and await self._check_warm():
                self._last_used = time.monotonic()
                return
            await asyncio.get_running_loop().run_in_executor(None, self._launch)
            self._last_used = time.monotonic()

    def _recorded_cluster(self) -> clusters.ClusterRecord | None:
        """The cluster an earlier process launched for this key, if its record is still here."""
        try:
            name = str(json.loads(_key_path(self.key).read_text())["cluster"])
            return clusters.load(name) if clusters.exists(name) else None
        except (OSError, ValueError, KeyError, TypeError, RawvmError):
            return None

    async def _check_warm(self) -> bool:
        """Drop machines that stopped (or are about to, for idleness); True while one is left."""
        now = time.time()

        async def warm(machine: _Machine) -> None:
            if machine.dead:
                return
            try:
                status = await self._agent(machine).status()
            except (AgentError, ValueError):
                status = {}
            phase = status.get("phase", "")
            stops_at = (status.get("idle") or {}).get("stops_at")
            if phase not in ("ready", "busy", "idle"):
                self._kill(machine, f"machine {machine.id} is {phase or 'not answering'}")
            elif isinstance(stops_at, int | float) and stops_at - now < STOPPING_MARGIN_S and not machine.load:
                self._kill(machine, f"machine {machine.id} is about to stop for idleness")

        await asyncio.gather(*(warm(m) for m in self.machines))
        return any(not m.dead for m in self.machines)

    def _launch(self) -> None:
        """Lock, stage, launch and wait for ready (in a worker thread: the front door is synchronous)."""
        environment = dataclasses.replace(
            self.options.launch.environment, bundle_cache=bundle_path(self.key), project_dir=self.project_dir
        )
        launched = launch(self.options.launch.replace(environment=environment))
        self.launches += 1
        record = launched.record
        ready_or_fail(launched, self.options.launch.task_env)  # workers see it
        path = _key_path(self.key)
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        path.write_text(json.dumps({"cluster": record.name}))
        self.record = record
        self.machines = [_Machine(m.id, m.agent_url) for m in record.machines]

    def _kill(self, machine: _Machine, why: str) -> None:
        """Out of the pool: its unsent calls go back to the backlog, those it held fail."""
        if machine.dead:
            return
        machine.dead = why
        self.backlog.extendleft(reversed(machine.outbox))
        machine.outbox.clear()
        for call in machine.inflight.values():
            if not call.future.done():
                call.future.set_exception(RemoteError(f"{why}; the call was running there"))
        machine.inflight.clear()

    # -- calls ------------------------------------------------------------------------------------------------

    async def run(self, payloads: Sequence[bytes], loads: Callable[[bytes], Any]) -> list[asyncio.Future[Any]]:
        """Queue the calls; their futures, in order."""
        self._loads = loads
        await self.ensure()
        loop = asyncio.get_running_loop()
        calls = []
        for payload in payloads:
            self._next += 1
            calls.append(_Call(self._next, payload, loop.create_future()))
        self.backlog.extend(calls)
        self._dispatch()
        return [c.future for c in calls]

    def workers(self) -> int:
        """Call workers on the live machines, as far as they have said (0 before any has)."""
        return sum(m.workers for m in self.machines if not m.dead)

    def _dispatch(self) -> None:
        live = [m for m in self.machines if not m.dead]
        if not live:
            while self.backlog:
                call = self.backlog.popleft()
                if not call.future.done():
                    call.future.set_exception(RemoteError(f"no machine of {self.cluster} is left to run the call"))
            return
        while self.backlog:
            machine = min(live, key=lambda m: m.load)
            if machine.load >= machine.window:
                break
            call = self.backlog.popleft()
            if not call.future.cancelled():
                machine.outbox.append(call)
        for machine in live:
            if machine.outbox and not machine.sending:
                machine.sending = True
                self._spawn(self._send(machine))

    async def _send(self, machine: _Machine) -> None:
        try:
            while machine.outbox and not machine.dead:
                batch: list[_Call] = []
                size = 0
                while machine.outbox and len(batch) < MAX_BATCH_CALLS:
                    if batch and size + len(machine.outbox[0].payload) > MAX_BATCH_BYTES:
                        break
                    call = machine.outbox.popleft()
                    batch.append(call)
                    size += len(call.payload)
                for call in batch:
                    machine.inflight[call.id] = call
                try:
                    packed = pack((c.id, 0, c.payload) for c in batch)
                    workers = await self._agent(machine).submit_calls(self.client, packed, slots=self.options.slots)
                except (AgentError, ValueError) as exc:
                    if isinstance(exc, AgentError) and exc.status == QUEUE_FULL:  # wait for results, try again
                        for call in reversed(batch):
                            del machine.inflight[call.id]
                            machine.outbox.appendleft(call)
                        await asyncio.sleep(0.5)
                        continue
                    for call in reversed(batch):  # never sent, or refused: another machine may take them
                        machine.inflight.pop(call.id, None)
                        self.backlog.appendleft(call)
                    self._kill(machine, f"machine {machine.id} refused calls ({_words(exc)})")
                    break
                if workers:
                    machine.workers = workers
                    machine.window = max(DEFAULT_WINDOW, workers * WINDOW_PER_WORKER)
                if not machine.polling:
                    machine.polling = True
                    self._spawn(self._poll(machine))
        finally:
            machine.sending = False
            self._dispatch()

    async def _poll(self, machine: _Machine) -> None:
        assert self._loads is not None
        failures = 0
        try:
            while machine.inflight and not machine.dead:
                try:
                    frames = unpack(await self._agent(machine).call_results(self.client, wait=RESULTS_WAIT_S))
                except (AgentError, ValueError) as exc:
                    failures += 1
                    if failures >= 3:
                        self._kill(machine, f"machine {machine.id} stopped answering ({_words(exc)})")
                        break
                    await asyncio.sleep(0.5 * failures)
                    continue
                failures = 0
                for call_id, status, payload in frames:
                    call = machine.inflight.pop(call_id, None)
                    if call is None or call.future.done():
                        continue
                    try:
                        ok, value = decode_result(self._loads, status, payload)
                    except Exception as exc:  # a result that does not unpickle here (a module only remote has)
                        ok, value = False, exc
                    if ok:
                        call.future.set_result(value)
                    else:
                        call.future.set_exception(value)
                self._last_used = time.monotonic()
                self._dispatch()
        finally:
            machine.polling = False
            self._dispatch()

    def drop_unsent(self) -> int:
        """Forget calls not sent yet (a map that already failed); how many."""
        dropped = 0
        for queue in (self.backlog, *(m.outbox for m in self.machines)):
            for call in queue:
                call.future.cancel()
                dropped += 1
            queue.clear()
        return dropped

    async def cancel_remote(self) -> None:
        """Stop this process's calls on every machine (a map interrupted): queued ones dropped, running ones'
        workers cancelled. Best effort: a machine that does not answer is left to finish them."""
        live = [self._agent(m) for m in self.machines if not m.dead]
        await asyncio.gather(*(agent.cancel_calls(self.client) for agent in live), return_exceptions=True)

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None


def _words(exc: AgentError | ValueError) -> str:
    """What went wrong in an exchange with an agent, as the pool's messages say it: the agent's or the
    transport's own words."""
    if isinstance(exc, AgentError):
        return exc.reason
    return str(exc) or type(exc).__name__


# -- pools of this process ----------------------------------------------------------------------------------------

POOLS: dict[str, Pool] = {}  # live pools by reuse key, one per key in this process (tests clear it)
_pools_lock = threading.Lock()


def pool_for(key: str, options: PoolOptions, project_dir: Path) -> Pool:
    with _pools_lock:
        if key not in POOLS:
            POOLS[key] = Pool(key, options, project_dir)
        return POOLS[key]


def forget(pool: Pool) -> None:
    with _pools_lock:
        if POOLS.get(pool.key) is pool:
            del POOLS[pool.key]
    _key_path(pool.key).unlink(missing_ok=True)


def _close_all() -> None:
    if _loop is None or not _loop.is_running():
        return

    async def close() -> None:
        await asyncio.gather(*(p.close() for p in list(POOLS.values())), return_exceptions=True)

    with contextlib.suppress(Exception):
        asyncio.run_coroutine_threadsafe(close(), _loop).result(timeout=5)
