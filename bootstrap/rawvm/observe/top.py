"""Following many agents at once for ``rawvm top``: each machine's newest telemetry, phase, task and idle clock.

One asyncio task per machine polls its agent every ``interval``: ``GET /v1/samples?after=SEQ`` (msgpack; only
the samples it has not seen, and on the first call just the newest two, enough for a network rate) and
``GET /v1/status``; ``GET /v1/tasks`` only when the set of running tasks changed. One shared agent session with a
bounded connector carries every request, and each request has its own short timeout: a machine that stops
answering is marked so and polled less often (backing off), and never holds up the others. Reading samples and
status is never activity to an agent, so watching a cluster never keeps it alive.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import msgpack
from rawvm_agent.telemetry.collectors.gpu import CLOCK_EVENT_REASONS

from rawvm.agent.client import AgentClient, AgentError, AgentSession, agent_session
from rawvm.clusters import ClusterRecord
from rawvm.providers import FREE_PROVIDERS
from rawvm.providers.base import short_id

DEFAULT_CONNECTIONS = 64
REQUEST_TIMEOUT_S = 3.0
MAX_BACKOFF_S = 10.0
# The "gpu_idle" reason only says that nothing runs; the others hold the clocks down under load.
QUIET_REASONS = frozenset({"gpu_idle"})


@dataclass
class GpuView:
    index: int
    name: str = ""
    util_percent: float | None = None
    memory_used_bytes: int | None = None
    memory_total_bytes: int | None = None
    power_watts: float | None = None
    temperature_celsius: float | None = None
    throttle: list[str] = field(default_factory=list)
    tensor_active_percent: float | None = None  # NVML GPM (Hopper and later); None where the GPU lacks it

    @classmethod
    def of(cls, gpu: dict[str, Any]) -> GpuView:
        mask = gpu.get("clock_event_reasons")
        reasons = [n for bit, n in CLOCK_EVENT_REASONS.items() if isinstance(mask, int) and mask & bit]
        return cls(
            index=int(gpu.get("index", 0)),
            name=str(gpu.get("name", "")),
            util_percent=gpu.get("utilization_gpu_percent"),
            memory_used_bytes=gpu.get("memory_used_bytes"),
            memory_total_bytes=gpu.get("memory_total_bytes"),
            power_watts=gpu.get("power_watts"),
            temperature_celsius=gpu.get("temperature_celsius"),
            throttle=[r for r in reasons if r not in QUIET_REASONS],
        )


@dataclass
class MachineView:
    """What ``rawvm top`` shows of one machine; ``--json`` prints these as they are."""

    cluster: str
    machine: str
    agent_url: str
    provider: str
    price_per_hour: float | None  # USD; None: unknown (never guessed)
    launched_at: float
    answering: bool = False
    last_answer: float | None = None  # unix time of the agent's last answer
    error: str = ""
    phase: str = "unknown"
    task: str = ""
    tasks_running: int = 0
    idle: bool = False
    idle_seconds: float = 0.0
    keepalive_s: float = 0.0
    sample_time: float | None = None
    seq: int = 0
    cpu_percent: float | None = None
    memory_used_bytes: int | None = None
    memory_total_bytes: int | None = None
    disk_used_bytes: int | None = None
    disk_total_bytes: int | None = None
    net_receive_bytes_per_s: float | None = None
    net_transmit_bytes_per_s: float | None = None
    gpus: list[GpuView] = field(default_factory=list)
    tensor_active_percent: float | None = None  # mean over the GPUs that report it (GPM); None: none does

    def cost_so_far(self, now: float) -> float | None:
        """USD since launch at the record's price; None when the price is unknown."""
        if self.price_per_hour is None:
            return None
        return self.price_per_hour * max(0.0, now - self.launched_at) / 3600.0


def price_of(record: ClusterRecord, price_per_hour: float) -> float | None:
    """A machine's price as far as it is known: free providers cost 0; a 0 from a paid provider means unknown."""
    if record.provider in FREE_PROVIDERS:
        return 0.0
    return price_per_hour if price_per_hour > 0 else None


def views_of(records: Iterable[ClusterRecord]) -> list[MachineView]:
    return [
        MachineView(
            cluster=r.name,
            machine=short_id(m.id, r.name),
            agent_url=m.agent_url.rstrip("/"),
            provider=r.provider,
            price_per_hour=price_of(r, m.price_per_hour),
            launched_at=m.launched_at or r.created,
        )
        for r in records
        for m in r.machines
    ]


def root_filesystem(disk: dict[str, Any]) -> tuple[int | None, int | None]:
    """(used, size) of ``/``, else of the largest filesystem."""
    filesystems = [f for f in disk.get("filesystems", []) if isinstance(f, dict)]
    if not filesystems:
        return None, None
    root = next((f for f in filesystems if f.get("mountpoint") == "/"), None)
    chosen = root or max(filesystems, key=lambda f: int(f.get("size_bytes", 0)))
    return chosen.get("used_bytes"), chosen.get("size_bytes")


def _net_totals(network: Any) -> tuple[int, int] | None:
    """Received and transmitted bytes over every interface but loopback."""
    if not isinstance(network, dict):
        return None
    rx = tx = 0
    for name, counters in network.items():
        if name == "lo" or not isinstance(counters, dict):
            continue
        rx += int(counters.get("receive_bytes", 0))
        tx += int(counters.get("transmit_bytes", 0))
    return rx, tx


def apply_samples(view: MachineView, samples: Sequence[dict[str, Any]], previous: dict[str, Any] | None) -> None:
    """Update ``view`` from the newest of ``samples`` (the one before it, or ``previous``, gives rates)."""
    if not samples:
        return
    newest = samples[-1]
    before = samples[-2] if len(samples) > 1 else previous
    view.seq = int(newest.get("seq", view.seq))
    view.sample_time = float(newest.get("t", 0.0))
    cpu = newest.get("cpu")
    view.cpu_percent = float(cpu["percent"]) if isinstance(cpu, dict) and "percent" in cpu else None
    memory = newest.get("memory")
    if isinstance(memory, dict):
        view.memory_used_bytes = memory.get("used_bytes")
        view.memory_total_bytes = memory.get("total_bytes")
    disk = newest.get("disk")
    if isinstance(disk, dict):
        view.disk_used_bytes, view.disk_total_bytes = root_filesystem(disk)
    now_net, before_net = _net_totals(newest.get("network")), _net_totals((before or {}).get("network"))
    if now_net is not None and before_net is not None and before is not None:
        dt = float(newest["t"]) - float(before["t"])
        if dt > 0:
            view.net_receive_bytes_per_s = max(0.0, (now_net[0] - before_net[0]) / dt)
            view.net_transmit_bytes_per_s = max(0.0, (now_net[1] - before_net[1]) / dt)
    gpus = newest.get("gpu")
    view.gpus = [GpuView.of(g) for g in gpus if isinstance(g, dict)] if isinstance(gpus, list) else []
    _apply_profiling(view, newest.get("gpu_profiling"))


def _apply_profiling(view: MachineView, profiling: Any) -> None:
    """Tensor-core activity from the GPM collector's entries, per GPU and as the machine's mean."""
    entries = profiling if isinstance(profiling, list) else []
    tensor = {
        e.get("index"): float(e["tensor_active_percent"])
        for e in entries
        if isinstance(e, dict) and isinstance(e.get("tensor_active_percent"), int | float)
    }
    for gpu in view.gpus:
        gpu.tensor_active_percent = tensor.get(gpu.index)
    view.tensor_active_percent = sum(tensor.values()) / len(tensor) if tensor else None


def apply_status(view: MachineView, status: dict[str, Any]) -> None:
    view.phase = str(status.get("phase", "unknown"))
    idle = status.get("idle") or {}
    view.idle = bool(idle.get("idle"))
    view.idle_seconds = float(idle.get("idle_seconds") or 0.0)
    view.keepalive_s = float(idle.get("keepalive_s") or 0.0)
    view.tasks_running = int((status.get("tasks") or {}).get("running", 0))
    if not view.tasks_running:
        view.task = ""


def running_task(tasks: Sequence[dict[str, Any]]) -> str:
    """The command line of the newest running task, "" when none runs."""
    running = [t for t in tasks if t.get("state") == "running"]
    if not running:
        return ""
    newest = max(running, key=lambda t: float(t.get("started_at") or 0.0))
    return " ".join(str(a) for a in newest.get("argv", []))


class _Machine:
    """One followed agent: its view, its client, the last sample seen, and what to ask next."""

    def __init__(self, view: MachineView, agent: AgentClient) -> None:
        self.view = view
        self.agent = agent
        self.last_sample: dict[str, Any] | None = None
        self.task_ids: tuple[int, int] = (0, 0)  # (running, known) tasks: fetch /v1/tasks when it changes
        self.failures = 0


class Follower:
    """Follows every machine of ``records``; ``views`` is always the latest picture."""

    def __init__(
        self,
        records: Sequence[ClusterRecord],
        *,
        interval: float = 1.0,
        connections: int = DEFAULT_CONNECTIONS,
        timeout: float = REQUEST_TIMEOUT_S,
    ) -> None:
        self._records = {r.name: r for r in records}
        self._views = views_of(records)
        self._machines: list[_Machine] = []
        self.interval = interval
        self.connections = connections
        self.timeout = timeout
        self._session: AgentSession | None = None
        self.answers = 0  # looks that got an answer, all machines together (bench/follow.py counts them)

    @property
    def views(self) -> list[MachineView]:
        return self._views

    async def __aenter__(self) -> Follower:
        # Bounded, so following a thousand machines never opens a thousand sockets: ``connections`` in all,
        # at most two to one agent.
        self._session = agent_session(connections=self.connections, per_host=2, keepalive_s=30)
        self._machines = [_Machine(view, self._client(view)) for view in self._views]
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    def _client(self, view: MachineView) -> AgentClient:
        # Each request has its own short timeout (and a shorter one to connect): a silent machine costs little.
        return AgentClient.for_cluster(
            self._records[view.cluster],
            view.agent_url,
            session=self._session,
            timeout=self.timeout,
            connect_timeout=min(self.timeout, 2.0),
        )

    async def poll(self, machine: _Machine) -> bool:
        """One look at one machine; False (and the view says why) when its agent did not answer."""
        view = machine.view
        if not view.agent_url:
            view.error = "no agent address"
            return False
        try:
            if machine.last_sample is None:
                packed = await machine.agent.packed_samples(after=-1, limit=2, newest=True)
            else:
                packed = await machine.agent.packed_samples(after=view.seq, limit=60, newest=True)
            samples = msgpack.unpackb(packed, raw=False, strict_map_key=False)
            status = await machine.agent.status()
            apply_status(view, status)
            tasks = status.get("tasks") or {}
            marker = (int(tasks.get("running", 0)), int(tasks.get("total", 0)))
            if marker != machine.task_ids:
                machine.task_ids = marker
                view.task = running_task(await machine.agent.tasks()) if marker[0] else ""
        except (AgentError, ValueError) as exc:
            machine.failures += 1
            view.answering = False
            view.error = _describe(exc)
            return False
        if isinstance(samples, list):
            apply_samples(view, samples, machine.last_sample)
            if samples:
                machine.last_sample = samples[-1]
        machine.failures = 0
        self.answers += 1
        view.answering = True
        view.error = ""
        view.last_answer = time.time()
        return True

    async def poll_all(self) -> list[MachineView]:
        """One look at every machine at once (what ``--json`` prints)."""
        await asyncio.gather(*(self.poll(m) for m in self._machines))
        return self.views

    async def _follow(self, machine: _Machine) -> None:
        loop = asyncio.get_running_loop()
        while True:
            started = loop.time()
            ok = await self.poll(machine)
            wait = self.interval if ok else min(self.interval * 2**machine.failures, MAX_BACKOFF_S)
            await asyncio.sleep(max(0.0, started + wait - loop.time()))

    async def run(self) -> None:
        """Follow every machine until cancelled."""
        tasks = [asyncio.create_task(self._follow(m)) for m in self._machines]
        try:
            await asyncio.gather(*tasks)
        finally:
            for task in tasks:
                task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.gather(*tasks, return_exceptions=True)


def _describe(exc: AgentError | ValueError) -> str:
    """Why a machine shows as not answering: ``HTTP 503``, ``no answer (timed out)``, ..."""
    if isinstance(exc, ValueError):  # an answer that does not decode
        return f"no answer ({type(exc).__name__})"
    if exc.status is not None:
        return f"HTTP {exc.status}"
    return f"no answer ({exc.no_answer})" if exc.no_answer else "no answer"
