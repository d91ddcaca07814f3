"""``rawvm run`` on a launched cluster, with what users do every day: Ctrl-C that cancels, fresh code on warm
machines, variables and secrets, each machine's output kept on request; and ``rawvm cancel`` from elsewhere.

Ctrl-C while a run waits or its tasks run: the first one cancels the tasks on every machine (the agent's
``POST /v1/tasks/{id}/cancel``: SIGTERM to the task's process group, SIGKILL after a grace period, the output so
far kept and streamed to the end); a second one, before the run has returned, asks the caller to stop the machines
now. The handler exists only while the run's event loop runs in the main thread (from Jupyter's thread there is
none, and Ctrl-C stays Python's KeyboardInterrupt).
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import sys
import time
from collections.abc import Awaitable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from rawvm import boot_timings, clusters
from rawvm.agent.client import AgentClient, AgentError, agent_session
from rawvm.code_sync import code_states, sync_code, sync_environment
from rawvm.errors import RawvmError, UsageError
from rawvm.gang import Gang, NodeRun, cancel_if_stopped, gpus_of, run_gang
from rawvm.options import Environment, TaskEnvironment
from rawvm.progress import make_progress
from rawvm.providers.base import Machine
from rawvm.session import Launched, clients, run_sync, say, stream_task, task_exit_code, wait_ready

CANCEL_GRACE_S = 5.0  # SIGTERM, then SIGKILL after this long
DRAIN_S = 15.0  # after a cancel, how long the output streams may take to end
DOUBLE_TAP_S = 1.0  # after the first Ctrl-C's cancel, how long a second one still stops the machines
INTERRUPTED = 130  # 128 + SIGINT, as a shell reports it


@dataclass
class MachineOutput:
    """One machine's share of a run: its task's exit code, and its output when the run was asked to keep it."""

    exit_code: int
    stdout: str = ""
    stderr: str = ""


@dataclass
class RunOutcome:
    outputs: dict[str, MachineOutput] = field(default_factory=dict)
    interrupts: int = 0  # Ctrl-C pressed while it ran: 1 cancelled the tasks, 2 asks to stop the machines
    timings: dict[str, float] = field(default_factory=dict)
    gang_code: int | None = None  # the gang's code: the failed node's own (the others' 143 would hide it)

    @property
    def exit_code(self) -> int:
        if self.interrupts:
            return INTERRUPTED
        if self.gang_code is not None:
            return self.gang_code
        return max((o.exit_code for o in self.outputs.values()), default=0)


class Interrupts:
    """Counts Ctrl-C: ``first`` and ``second`` are set as they come."""

    def __init__(self) -> None:
        self.count = 0
        self.first = asyncio.Event()
        self.second = asyncio.Event()

    def hit(self) -> None:
        self.count += 1
        (self.first if self.count == 1 else self.second).set()

    def listen(self) -> bool:
        """Take SIGINT while the running loop runs; False where it cannot (not the main thread)."""
        try:
            asyncio.get_running_loop().add_signal_handler(signal.SIGINT, self.hit)
        except (ValueError, RuntimeError, NotImplementedError):
            return False
        return True

    @staticmethod
    def stop_listening() -> None:
        with contextlib.suppress(ValueError, RuntimeError, NotImplementedError):
            asyncio.get_running_loop().remove_signal_handler(signal.SIGINT)


async def until(work: Awaitable[Any], event: asyncio.Event) -> bool:
    """Wait for ``work`` or ``event``; True when ``work`` finished first (it is left running otherwise)."""
    done = asyncio.ensure_future(work)
    flag = asyncio.ensure_future(event.wait())
    await asyncio.wait({done, flag}, return_when=asyncio.FIRST_COMPLETED)
    flag.cancel()
    return done.done()


@dataclass(frozen=True)
class RunPlan:
    """What to run on every machine of a launched cluster, and how."""

    argv: list[str]
    env: TaskEnvironment = field(default_factory=TaskEnvironment)
    capture: bool = False
    sync_from: Path | None = None  # the project directory whose changed files go first; None: no sync
    relock: Environment | None = None  # the environment whose changes are installed first; None: not checked
    torchrun: bool = False  # each node's command under torchrun (rawvm.gang)


def run_on_cluster(launched: Launched, plan: RunPlan, output: TextIO, error_output: TextIO) -> RunOutcome:
    """Wait until every machine serves, sync the code, run ``plan`` on each and stream the output, from
    synchronous code; a failure names the cluster."""
    interrupts = Interrupts()
    try:
        return run_sync(_run(launched, plan, output, error_output, interrupts))
    except RawvmError as exc:
        raise RawvmError(f"{exc} (cluster {launched.record.name})") from None


async def _run(
    launched: Launched, plan: RunPlan, output: TextIO, error_output: TextIO, interrupts: Interrupts
) -> RunOutcome:
    outcome = RunOutcome()
    listening = interrupts.listen()
    try:
        await _steps(launched, plan, output, error_output, interrupts, outcome)
        if interrupts.count == 1:  # a double tap reads as two: wait a moment for the second
            await until(asyncio.sleep(DOUBLE_TAP_S), interrupts.second)
    finally:
        if listening:
            Interrupts.stop_listening()
    outcome.interrupts = interrupts.count
    return outcome


async def _steps(
    launched: Launched,
    plan: RunPlan,
    output: TextIO,
    error_output: TextIO,
    interrupts: Interrupts,
    outcome: RunOutcome,
) -> None:
    """Ready, sync, tasks: ``outcome`` filled as they go; returns early on Ctrl-C while waiting for the machines."""
    async with agent_session() as http:
        agents = clients(launched.record, http)
        mark = time.monotonic()
        view = make_progress(sys.stderr)
        statuses: dict[str, dict[str, Any]] = {}  # as each machine answered when it served: the head's GPUs
        try:
            ready = wait_ready(
                agents, launched.provider, launched.record, view, launched.ready_timeout_s, seen=statuses
            )
            if not await until(ready, interrupts.first):
                return
        finally:
            view.close()
        outcome.timings["ready"] = time.monotonic() - mark
        if plan.sync_from is not None or plan.relock is not None:
            mark = time.monotonic()
            if not await until(_sync(agents, plan), interrupts.first):
                return  # Ctrl-C while sending: no task was started
            outcome.timings["sync"] = time.monotonic() - mark
        mark = time.monotonic()
        head = statuses[next(iter(agents))]
        await _tasks(agents, launched.record.machines, plan, output, error_output, interrupts, outcome, head)
        outcome.timings["task"] = time.monotonic() - mark
        # A machine's phases end with its first task's start; a warm run asks only machines not known that far.
        if not all("first_task_started" in m.boot_phases for m in launched.record.machines):
            boot_timings.remember(launched.record, await boot_timings.fetch(agents))  # first_task_started now, too


async def _sync(agents: dict[str, AgentClient], plan: RunPlan) -> None:
    """The project's changed files and the environment's changes, to every machine; a progress line each. The two
    checks run side by side, on one ``GET /v1/code`` a machine, and their local work (the files' hashes, the
    environment's fingerprint) runs while that request is out: a warm run with nothing changed waits for the
    slower one only."""
    states = code_states(agents)

    async def files() -> str:
        return (await sync_code(agents, plan.sync_from, states)).line() if plan.sync_from is not None else ""

    async def environment() -> str:
        return await sync_environment(agents, plan.relock, states) if plan.relock is not None else ""

    for line in await asyncio.gather(files(), environment()):
        if line:
            say(line)


async def _tasks(
    agents: dict[str, AgentClient],
    machines: list[Machine],
    plan: RunPlan,
    output: TextIO,
    error_output: TextIO,
    interrupts: Interrupts,
    outcome: RunOutcome,
    head_status: dict[str, Any],
) -> None:
    """Fill ``outcome``: run the task on every machine as one gang job (``rawvm.gang``: ranks and peers in each
    task's environment, the others cancelled when one node fails); on the first Ctrl-C cancel them all and let their
    output drain. ``head_status``: the first machine's ``/v1/status`` (its GPUs size the gang)."""
    gang = Gang.of(machines, gpus_of(head_status))
    many = len(agents) > 1
    kept: dict[str, dict[str, bytearray]] = {}

    async def run_node(node: NodeRun, out: TextIO, err: TextIO) -> int:
        argv = gang.torchrun_argv(plan.argv, node.rank) if plan.torchrun else plan.argv
        env = {"PYTHONUNBUFFERED": "1", **plan.env.all_values(), **gang.env(node.rank)}
        try:
            node.task_id = await node.client.submit(argv, env=env, secret_env=plan.env.secret_names)
        except AgentError as exc:
            if exc.status == 400 and "No such file or directory" in exc.reason:
                say(f"command not found on {node.name}: {argv[0]}")
                return 127
            raise
        if interrupts.first.is_set():  # Ctrl-C came while it was being submitted
            node.stop = True
        await cancel_if_stopped(node)
        keep: dict[str, bytearray] | None = kept.setdefault(node.name, {}) if plan.capture else None
        await stream_task(node.client, node.task_id, f"[{node.name}] " if many else "", out, err, keep=keep)
        return task_exit_code(await node.client.wait_task(node.task_id))

    def outputs() -> dict[str, MachineOutput]:
        result = {}
        for node in nodes:
            text = {k: v.decode("utf-8", errors="replace") for k, v in kept.get(node.name, {}).items()}
            code = node.code if node.code is not None else 1
            result[node.name] = MachineOutput(code, text.get("stdout", ""), text.get("stderr", ""))
        return result

    nodes = [NodeRun(rank, mid, client) for rank, (mid, client) in enumerate(agents.items())]
    work = asyncio.ensure_future(run_gang(nodes, run_node, output, error_output))
    if await until(work, interrupts.first):
        if work.result().failure and many:  # one machine's failure speaks for itself (its output, its code)
            say(work.result().failure)
        outcome.outputs, outcome.gang_code = outputs(), work.result().code
        return
    for node in nodes:
        node.stop = True  # a node still submitting cancels its own task (cancel_if_stopped)
    cancels = [n.client.cancel_task(n.task_id, grace=CANCEL_GRACE_S) for n in nodes if n.task_id]
    finished = await until(asyncio.gather(*cancels, return_exceptions=True), interrupts.second)
    if finished:
        with contextlib.suppress(TimeoutError):
            await until(asyncio.wait_for(asyncio.shield(work), DRAIN_S), interrupts.second)
    if not work.done():
        work.cancel()
        with contextlib.suppress(asyncio.CancelledError, RawvmError):
            await work
        return
    if work.exception() is None:
        outcome.outputs = outputs()


async def _cancel_on(client: AgentClient, task: str | None) -> list[str]:
    """Cancel ``task`` (or every running task, and the machine's batch queue) on one machine; the ids cancelled."""
    done = []
    if task is None:
        try:
            done += [str(t) for t in (await client.batch_cancel(grace=CANCEL_GRACE_S)).get("cancelled", [])]
        except AgentError as exc:
            if exc.status != 404:  # 404: no batch on this machine
                raise
    ids = [task] if task is not None else [str(t["id"]) for t in await client.tasks() if t.get("state") == "running"]
    for task_id in ids:
        try:
            await client.cancel_task(task_id, grace=CANCEL_GRACE_S)
        except AgentError as exc:
            if exc.status == 404:
                continue
            raise
        done.append(task_id)
    return done


def cancel(cluster: str, task: str | None = None) -> dict[str, list[str]]:
    """Cancel ``task`` (an id from ``rawvm logs``/the API), or every running task, on each machine of
    ``cluster``; the ids cancelled per machine. Machines that do not answer are left out."""
    record = clusters.load(cluster)

    async def everywhere() -> dict[str, list[str]]:
        async with agent_session() as http:
            agents = clients(record, http)
            answers = await asyncio.gather(*(_cancel_on(c, task) for c in agents.values()), return_exceptions=True)
        return {mid: a for mid, a in zip(agents, answers, strict=True) if isinstance(a, list)}

    cancelled = run_sync(everywhere())
    if task is not None and not any(cancelled.values()):
        raise UsageError(f"no task {task!r} on the machines of {cluster}")
    return cancelled
