"""Talking to a launched cluster: wait until every agent serves, run a command on each, stream its output.

Everything here speaks only the agent API (``rawvm.agent.client``), whatever the provider; the provider is asked
only whether a silent machine is still alive. Exit code of a run: the task's exit code; with several machines,
the largest of them (so any failure shows as a failure); a task ended by signal N counts as 128 + N. Several
machines run one gang job (``rawvm.gang``): ranks and peers in each task's environment, all or nothing.
"""

from __future__ import annotations

import asyncio
import codecs
import concurrent.futures
import re
import sys
import time
from collections.abc import Coroutine
from dataclasses import dataclass
from typing import Any, TextIO, TypeVar

from rawvm_agent.config import IdleConfig
from rawvm_agent.durations import format_duration

from rawvm import boot_timings, clusters, costs
from rawvm.agent.client import AgentClient, AgentError, AgentSession, agent_session
from rawvm.errors import RawvmError
from rawvm.options import TaskEnvironment
from rawvm.progress import MachineProgress, install_detail, make_progress
from rawvm.progress import say as say  # re-exported: the front door's commands say their lines through here
from rawvm.providers import FREE_PROVIDERS, get_provider
from rawvm.providers.base import Machine, Provider

T = TypeVar("T")
SERVING_PHASES = frozenset({"ready", "busy", "idle"})
ENDED_PHASES = frozenset({"failed", "stopping", "off"})
POLL_S = 0.25  # between two status reads of a machine that is not ready yet
STATUS_WAIT_S = 1.0  # how long an agent may hold a status read for a phase change (progress shows meanwhile)


def run_sync(coro: Coroutine[Any, Any, T]) -> T:
    """``asyncio.run``, also from code that already runs an event loop (Jupyter): then in a worker thread."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coro)
    pool = concurrent.futures.ThreadPoolExecutor(max_workers=1)
    try:
        return pool.submit(asyncio.run, coro).result()
    finally:
        pool.shutdown(wait=False)  # Ctrl-C here must not wait for the run: the caller cancels it


@dataclass
class Launched:
    """A cluster just launched: its provider, its record, and the seconds each launch step took."""

    provider: Provider
    record: clusters.ClusterRecord
    timings: dict[str, float]
    ready_timeout_s: float | None = None  # None: the provider's boot allowance


def provider_of(record: clusters.ClusterRecord) -> Provider:
    """The provider a cluster record was launched with (and its options, e.g. the region)."""
    return get_provider(record.provider, **record.provider_options)


def clients(record: clusters.ClusterRecord, session: AgentSession) -> dict[str, AgentClient]:
    """One agent client per machine of ``record``, by short id (``m0``), sharing ``session``."""
    return {m.short_id: AgentClient.for_cluster(record, m.agent_url, session=session) for m in record.machines}


async def wait_ready(
    agents: dict[str, AgentClient],
    provider: Provider,
    record: clusters.ClusterRecord,
    view: MachineProgress,
    timeout: float | None = None,
    env: TaskEnvironment | None = None,
    seen: dict[str, dict[str, Any]] | None = None,
) -> None:
    """Poll every agent until it serves; raise when one fails, its machine stops, or ``timeout`` passes. With
    ``env``, each agent is handed the variables (and secrets) every later task of its machine sees; with ``seen``,
    each machine's status that showed it serving is kept there (a caller needing it asks no second time)."""
    timeout = provider.ready_timeout_s if timeout is None else timeout
    deadline = time.monotonic() + timeout
    pending = dict(agents)
    by_id = {m.short_id: m for m in record.machines}
    billed = record.provider not in FREE_PROVIDERS
    phases: dict[str, str] = {}  # the phase each machine last showed: its next read waits for a change
    reads: dict[str, asyncio.Task[dict[str, Any] | None]] = {}
    asked: dict[str, float] = {}  # when each machine's last read began: the next waits until POLL_S after it
    try:
        while pending:
            if billed:
                view.cost(costs.cost_line(record, costs.cost_of(record, time.time())))
            for mid, client in pending.items():
                if mid not in reads:
                    now = time.monotonic()
                    delay = max(asked.get(mid, now - POLL_S) + POLL_S - now, 0.0)
                    asked[mid] = now + delay
                    reads[mid] = asyncio.ensure_future(_read_status(client, phases.get(mid, ""), delay))
            left = deadline - time.monotonic()
            done, _ = await asyncio.wait(reads.values(), timeout=max(left, 0.0), return_when=asyncio.FIRST_COMPLETED)
            for mid in [m for m, read in reads.items() if read in done]:
                status = reads.pop(mid).result()
                if status is None:
                    if not provider.alive(by_id[mid]):
                        raise RawvmError(f"machine {mid} of {record.name} stopped before its agent answered")
                    view.update(mid, "booting")
                    continue
                phase = phases[mid] = str(status.get("phase", ""))
                view.update(mid, phase, str(status.get("error") or "") if phase == "failed" else install_detail(status))
                if phase in SERVING_PHASES:
                    del pending[mid]
                    if seen is not None:
                        seen[mid] = status
                    await hand_sink(agents[mid], provider, record, by_id[mid])
                    if env:
                        await agents[mid].set_env(env.all_values(), env.secret_names)
                elif phase in ENDED_PHASES:
                    why = status.get("error") or status.get("stop_reason") or phase
                    raise RawvmError(f"machine {mid} of {record.name} is {phase}: {why}")
            if pending and time.monotonic() > deadline:
                raise RawvmError(
                    f"{', '.join(pending)} not ready after {format_duration(timeout)}: "
                    f"see 'rawvm logs {record.name}', stop with 'rawvm down {record.name}'"
                )
    finally:
        for read in reads.values():
            read.cancel()
        await asyncio.gather(*reads.values(), return_exceptions=True)


async def _read_status(client: AgentClient, phase: str, delay: float) -> dict[str, Any] | None:
    """A machine's status, read after ``delay`` seconds (the caller keeps POLL_S between two reads of a machine:
    an agent that does not hold its answers, or one that is down, is not asked in a loop); None while its agent
    does not answer (booting). Once a phase is known the agent holds the answer until the phase changes, or
    STATUS_WAIT_S: the laptop hears of a machine's readiness at once and asks about once a second meanwhile, not
    four times (on a small machine each answer costs its install CPU)."""
    await asyncio.sleep(delay)
    try:
        return await client.status(changed_from=phase, wait=STATUS_WAIT_S if phase else 0.0)
    except AgentError:
        return None


async def hand_sink(client: AgentClient, provider: Provider, record: clusters.ClusterRecord, machine: Machine) -> None:
    """Give a machine that now serves its own sink upload, when its provider makes one per machine (aws: a
    presigned POST for that machine's keys only, expiring once its backstop has powered it off). Every launch
    waits here, so every machine gets one; a machine that does not (this failed, or the laptop went away before
    it served) cannot upload, and its logs stay on it until it powers off."""
    lifetime = record.max_lifetime_s or IdleConfig().max_lifetime
    try:
        post = provider.sink_form_for(record.name, machine, lifetime)
        if post is not None:
            await client.hand_sink(post.url, post.fields)
    except RawvmError as exc:  # the machine still works; only its logs cannot leave it
        say(f"{machine.short_id}: cannot hand it its sink upload ({exc}): its logs will stay on it when it stops")


def printable(text: str) -> str:
    """``text`` without terminal control sequences: machine output is data, and an ESC or OSC sequence in it
    could retitle, recolour or rewrite the user's terminal (or worse, on terminals that answer queries). ANSI
    CSI/OSC sequences go whole; every other C0 control (and DEL, and C1 controls) goes too, except newline, tab
    and carriage return (progress bars)."""
    return _CONTROL.sub("", text)


# An OSC (ESC ] ... BEL or ESC \\), a CSI (ESC [ params final), another ESC sequence, or one control character.
_CONTROL = re.compile(
    r"\x1b\][^\x07\x1b]*(?:\x07|\x1b\\)?|\x1b\[[0-?]*[ -/]*[@-~]?|\x1b[@-_]?|[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]"
)


class StreamWriter:
    """Decodes a machine's output as it comes, without control sequences (``printable``); with a prefix, writes
    whole lines ``[m0] ...``."""

    def __init__(self, out: TextIO, prefix: str) -> None:
        self._out, self._prefix = out, prefix
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._pending = ""

    def write(self, data: bytes, final: bool = False) -> None:
        text = self._pending + printable(self._decoder.decode(data, final=final))
        if not self._prefix:
            self._pending = ""
            self._out.write(text)
        else:
            lines = text.split("\n")
            self._pending = "" if final else lines.pop()
            self._out.write("".join(f"{self._prefix}{line}\n" for line in lines if line or not final))
        self._out.flush()

    def close(self) -> None:
        self.write(b"", final=True)


def task_exit_code(record: dict[str, Any]) -> int:
    """The exit code a task record stands for: its own, 128 + N for signal N, 1 when it never exited."""
    code = record.get("exit_code")
    if not isinstance(code, int):
        return 1  # the task never ran to an exit (could not start, lost, interrupted)
    return 128 - code if code < 0 else code


async def stream_task(
    client: AgentClient,
    task_id: str,
    prefix: str,
    output: TextIO,
    error_output: TextIO,
    *,
    follow: bool = True,
    keep: dict[str, bytearray] | None = None,
) -> None:
    """Copy a task's stdout and stderr to ``output`` and ``error_output``: as they come until it ends (``follow``),
    or what it has written so far, page by page. With ``keep``, each stream's bytes are kept there too."""

    async def pump(stream: str, out: TextIO) -> None:
        writer = StreamWriter(out, prefix)
        kept = keep.setdefault(stream, bytearray()) if keep is not None else None
        if follow:
            async for chunk in client.follow_logs(task_id, stream=stream):
                writer.write(chunk)
                if kept is not None:
                    kept += chunk
        else:
            offset = 0
            while True:
                data, offset = await client.logs(task_id, stream=stream, offset=offset)
                if not data:
                    break
                writer.write(data)
                if kept is not None:
                    kept += data
        writer.close()

    await asyncio.gather(pump("stdout", output), pump("stderr", error_output))


async def wait_all_ready(launched: Launched, env: TaskEnvironment | None = None) -> dict[str, float]:
    """Wait until every machine serves (handing each ``env`` for its later tasks), keep their start-up phases on the
    record (``rawvm.boot_timings``); the timings."""
    record = launched.record
    async with agent_session() as http:
        agents = clients(record, http)
        view = make_progress(sys.stderr)
        mark = time.monotonic()
        try:
            await wait_ready(agents, launched.provider, record, view, launched.ready_timeout_s, env)
        finally:
            view.close()
        timings = {"ready": time.monotonic() - mark}
        boot_timings.remember(record, await boot_timings.fetch(agents))
    return timings


def ready_or_fail(launched: Launched, env: TaskEnvironment | None = None) -> None:
    """``wait_all_ready`` from synchronous code; a failure names the cluster, and timings join the launch's."""
    try:
        timings = run_sync(wait_all_ready(launched, env))
    except RawvmError as exc:
        raise RawvmError(f"{exc} (cluster {launched.record.name})") from None
    launched.timings.update(timings)


def stops_line(record: clusters.ClusterRecord) -> str:
    """How the cluster ends: ``NAME stops by itself after 20m idle (now: rawvm down NAME)``."""
    keep = format_duration(record.keepalive_s) if record.keepalive_s else "their keepalive"
    return f"{record.name} stops by itself after {keep} idle (now: rawvm down {record.name})"
