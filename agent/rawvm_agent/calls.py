"""Function calls (``@rawvm.function``): a queue of opaque call payloads, served to long-running workers.

The client POSTs batches of calls; the agent keeps them in memory and starts, on the first batch, ``slots``
call workers (``call_worker.py``) as ordinary tasks in the locked environment. Each worker long-polls
``/v1/calls/work`` over loopback: it posts the results of its last batch and receives the next. The client
long-polls ``/v1/calls/results``. Payloads are bytes the agent never unpickles; they are size-capped, and the
queue is bounded. Calls in flight (queued or running in a worker) keep the machine busy; idle workers do not.

A worker that dies (segfault, ``os._exit``, out of memory) fails only the calls it held, with status LOST, and
is replaced at once while calls wait, else by the next batch. When the agent stops, queued calls are dropped
with it: the client sees the machine go and fails them.

Workers authenticate with a token of their own (``worker_token``): random per agent process, never written, and
accepted on the workers' path alone, so a call's code never sees the cluster's token. They reach the agent over
mutual TLS like every client, pinning the cluster CA and presenting the agent's own certificate.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import secrets
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from rawvm_agent import call_worker
from rawvm_agent.call_worker import LOST
from rawvm_agent.config import AgentConfig
from rawvm_agent.environment import Environment
from rawvm_agent.state import AgentState
from rawvm_agent.tasks import NotReadyError, Task, TaskError, TaskManager, TaskRequest, TaskState

log = logging.getLogger("rawvm_agent.calls")

MAX_REQUEST_BYTES = 64 << 20  # one batch, either way
MAX_QUEUED_BYTES = 512 << 20  # payloads waiting for a worker, all clients together
MAX_SLOTS = 256
WORKER_WAIT_S = 20.0  # a worker's long poll; it comes straight back
MAX_CLIENT_WAIT_S = 30.0
WAIT_SLICE_S = 0.25  # long polls look this often whether the agent is leaving or the worker died
LOST_TAIL_BYTES = 2048


@dataclass
class _Worker:
    name: str
    task: Task
    held: list[int] = field(default_factory=list)  # internal call numbers it is running


class CallHost(Protocol):
    """What the hub needs of its agent (app.Agent): its tasks, config and whether it is stopping.

    A protocol rather than the Agent class itself, so this module does not import app.py, which builds the hub.
    """

    config: AgentConfig
    state_dir: Path
    environ: dict[str, str]
    state: AgentState
    tasks: TaskManager
    env: Environment | None

    @property
    def stopping(self) -> bool: ...


class CallHub:
    """The calls of one agent: queue, workers, results per client."""

    def __init__(self, agent: CallHost) -> None:
        self.agent = agent
        self.worker_token = secrets.token_urlsafe(32)  # the workers' own; the agent redacts it from every log
        self.queue: deque[tuple[int, bytes]] = deque()  # (internal number, payload), oldest first
        self.queued_bytes = 0
        self.routes: dict[int, tuple[str, int]] = {}  # internal number -> (client, the client's call id)
        self.results: dict[str, deque[tuple[int, int, bytes]]] = {}
        self.result_bytes: dict[str, int] = {}  # payload bytes in ``results``, per client
        self.workers: dict[str, _Worker] = {}
        self.slots = 0
        self.done_total = 0
        self._next = 0
        self._work_waiting = asyncio.Event()
        self._result_waiting: dict[str, asyncio.Event] = {}
        self.closing = False
        self._touched = False  # a call came or finished since the idle policy last looked
        self._watchers: set[asyncio.Task[None]] = set()

    # -- idle policy ----------------------------------------------------------------------------------------

    @property
    def in_flight(self) -> int:
        return len(self.routes)

    def tasks_busy(self) -> bool:
        """What the idle policy's ``task_running`` means with call workers around: a task other than a worker
        runs, a call is queued or running, or one came or ended since the last look. Idle workers are not work."""
        task_ids = {w.task.record.id for w in self.workers.values()}
        other = any(t.record.id not in task_ids for t in self.agent.tasks.running)
        busy = other or bool(self.routes) or self._touched
        self._touched = False
        return busy

    # -- client side ------------------------------------------------------------------------------------

    async def submit(self, client: str, frames: list[tuple[int, int, bytes]], slots: int) -> int:
        agent = self.agent
        if agent.stopping:
            raise NotReadyError(f"the agent is {agent.state.phase}; no new calls")
        if agent.env is None:
            raise NotReadyError(f"the environment is not ready (phase {agent.state.phase})")
        held, most = self.result_bytes.get(client, 0), agent.config.limits.call_result_bytes
        if held >= most:
            raise TaskError(f"{held} bytes of results wait for client {client!r} (at most {most}); fetch them first")
        size = sum(len(p) for _, _, p in frames)
        if self.queued_bytes + size > MAX_QUEUED_BYTES:
            raise TaskError(f"the call queue is full ({self.queued_bytes} bytes waiting); send fewer calls at once")
        await self._ensure_workers(slots)
        for call_id, _, payload in frames:
            self._next += 1
            self.routes[self._next] = (client, call_id)
            self.queue.append((self._next, payload))
            self.queued_bytes += len(payload)
        self._touched = True
        if self.queue:
            self._work_waiting.set()
        return len(frames)

    async def results_for(self, client: str, wait: float) -> list[tuple[int, int, bytes]]:
        waiting = self.results.setdefault(client, deque())
        deadline = time.monotonic() + wait
        event = self._result_waiting.setdefault(client, asyncio.Event())
        while not waiting and not self.leaving() and time.monotonic() < deadline:
            event.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(event.wait(), WAIT_SLICE_S)
        out: list[tuple[int, int, bytes]] = []
        size = 0
        while waiting and (not out or size + len(waiting[0][2]) <= MAX_REQUEST_BYTES):
            frame = waiting.popleft()
            out.append(frame)
            size += len(frame[2])
        self.result_bytes[client] = self.result_bytes.get(client, 0) - size
        if not waiting:
            self.results.pop(client, None)
            self.result_bytes.pop(client, None)
        return out

    def cancel_client(self, client: str) -> tuple[int, list[Task]]:
        """Drop ``client``'s queued calls; how many, and the tasks of the workers running one of its calls (a call
        cannot be stopped inside a worker: the caller cancels the worker, whose calls end LOST, and it is not
        replaced unless other calls wait)."""
        mine = {number for number, (owner, _) in self.routes.items() if owner == client}
        kept = deque((number, payload) for number, payload in self.queue if number not in mine)
        dropped = len(self.queue) - len(kept)
        self.queue, self.queued_bytes = kept, sum(len(payload) for _, payload in kept)
        held = {number for w in self.workers.values() for number in w.held}
        for number in mine - held:
            self.routes.pop(number, None)
        return dropped, [w.task for w in self.workers.values() if mine & set(w.held)]

    def close(self) -> None:
        """The agent is leaving: long polls answer now, or the server's shutdown would wait for them."""
        self.closing = True

    def leaving(self) -> bool:
        """The hub is closing or the agent is stopping: long polls answer now, with what they have."""
        return self.closing or self.agent.stopping

    def stats(self) -> dict[str, Any]:
        return {
            "queued": len(self.queue),
            "running": sum(len(w.held) for w in self.workers.values()),
            "results_waiting": sum(len(q) for q in self.results.values()),
            "workers": len(self.workers),
            "slots": self.slots,
            "done_total": self.done_total,
        }

    # -- worker side ------------------------------------------------------------------------------------

    async def work(self, name: str, done: list[tuple[int, int, bytes]], most: int) -> list[tuple[int, int, bytes]]:
        worker = self.workers.get(name)
        if worker is None:
            raise KeyError(name)
        for number, status, payload in done:
            if number in worker.held:
                worker.held.remove(number)
                self._deliver(number, status, payload)
        deadline = time.monotonic() + WORKER_WAIT_S
        while not self.queue:
            if self.leaving() or worker.task.done.is_set() or time.monotonic() >= deadline:
                return []
            self._work_waiting.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._work_waiting.wait(), WAIT_SLICE_S)
        if self.leaving():
            return []
        # A fair share, not a full batch: long calls must spread over the workers, tiny ones share a request.
        share = max(1, min(most, math.ceil(len(self.queue) / max(1, len(self.workers)))))
        out: list[tuple[int, int, bytes]] = []
        while self.queue and len(out) < share:
            number, payload = self.queue.popleft()
            self.queued_bytes -= len(payload)
            worker.held.append(number)
            out.append((number, 0, payload))
        return out

    def _deliver(self, number: int, status: int, payload: bytes) -> None:
        route = self.routes.pop(number, None)
        if route is None:
            return
        client, call_id = route
        self.results.setdefault(client, deque()).append((call_id, status, payload))
        self.result_bytes[client] = self.result_bytes.get(client, 0) + len(payload)
        self.done_total += 1
        self._touched = True
        if event := self._result_waiting.get(client):
            event.set()

    # -- workers ----------------------------------------------------------------------------------------

    def _worker_url(self) -> str:
        config = self.agent.config
        host = config.bind if config.bind not in ("", "0.0.0.0", "::") else "127.0.0.1"  # noqa: S104 (a test, not a bind)
        if ":" in host:
            host = f"[{host}]"
        return f"{'https' if config.tls_cert else 'http'}://{host}:{config.port}"

    def _worker_tls(self) -> dict[str, str]:
        """Where a worker finds the CA to pin and the certificate to present (the agent's own: the machine has no
        other, and a worker runs as the agent's user anyway); nothing when the API serves plain HTTP (tests)."""
        config = self.agent.config
        if not config.tls_cert:
            return {}
        return {"RAWVM_CALLS_CA": config.tls_ca, "RAWVM_CALLS_CERT": config.tls_cert, "RAWVM_CALLS_KEY": config.tls_key}

    def _script(self) -> Path:
        """The worker script, copied out of the agent's package: the locked environment cannot import it."""
        directory = self.agent.state_dir / "calls"
        directory.mkdir(mode=0o700, exist_ok=True)
        path = directory / "worker.py"
        source = Path(call_worker.__file__).read_bytes()
        if not path.is_file() or path.read_bytes() != source:
            path.write_bytes(source)
        return path

    async def _ensure_workers(self, slots: int) -> None:
        wanted = min(max(slots, 0) or os.cpu_count() or 1, MAX_SLOTS)
        self.slots = max(self.slots, wanted)
        while len(self.workers) < self.slots:
            await self._start_worker()

    async def _start_worker(self) -> None:
        agent = self.agent
        assert agent.env is not None
        self._next += 1
        name = f"w{self._next}"
        request = TaskRequest(
            argv=["python", str(self._script())],
            env={
                "RAWVM_CALLS_URL": self._worker_url(),
                "RAWVM_CALLS_TOKEN": self.worker_token,
                "RAWVM_CALLS_WORKER": name,
                "PYTHONUNBUFFERED": "1",
            }
            | self._worker_tls(),
            cwd="",
            secret_env=["RAWVM_CALLS_TOKEN"],
        )
        task = await agent.tasks.start(request, agent.env, agent.environ)
        self.workers[name] = worker = _Worker(name, task)
        log.info("call worker %s started as task %s", name, task.record.id)
        watcher = asyncio.create_task(self._watch(worker), name=f"calls-{name}")
        self._watchers.add(watcher)
        watcher.add_done_callback(self._watchers.discard)

    async def _watch(self, worker: _Worker) -> None:
        await worker.task.done.wait()
        self.workers.pop(worker.name, None)
        code = worker.task.record.exit_code
        if worker.held:
            tail = _tail(worker.task.log_path("stderr"))
            message = f"the worker process running this call died (exit code {code}); its last stderr:\n{tail}"
            for number in worker.held:
                self._deliver(number, LOST, message.encode())
            worker.held.clear()
        if self.agent.stopping or worker.task.record.state == TaskState.INTERRUPTED:
            return  # the agent is stopping or closing: no replacement
        log.warning("call worker %s ended (exit code %s)", worker.name, code)
        if self.queue:  # calls wait: replace it now (otherwise the next batch of calls does)
            with contextlib.suppress(TaskError):
                await self._ensure_workers(self.slots)


def _tail(path: Path) -> str:
    try:
        with path.open("rb") as fh:
            fh.seek(0, os.SEEK_END)
            fh.seek(max(0, fh.tell() - LOST_TAIL_BYTES))
            return fh.read().decode(errors="replace")
    except OSError:
        return ""
