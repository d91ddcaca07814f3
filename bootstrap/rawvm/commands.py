"""The commands on a cluster that speak to its agents: ``run`` (launch or reuse, then run and stream), ``up``,
``ls``, ``logs`` and ``down``. The typed public functions are in ``rawvm.api``; these take option objects.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from rawvm import clusters, costs, sinks
from rawvm.agent.client import AgentClient, AgentError, agent_session
from rawvm.errors import RawvmError
from rawvm.options import LaunchOptions, check_command
from rawvm.providers import FREE_PROVIDERS
from rawvm.providers.base import Machine, Provider
from rawvm.runs import MachineOutput, RunOutcome, RunPlan, cancel, run_on_cluster
from rawvm.session import (
    POLL_S,
    Launched,
    clients,
    provider_of,
    ready_or_fail,
    run_sync,
    say,
    stops_line,
    stream_task,
)


@dataclass
class RunResult:
    """What ``rawvm.run`` returns: the exit code (the largest of the machines'), the machines, the cost."""

    exit_code: int
    machines: list[Machine]
    cost_usd: float  # price_per_hour x wall time, summed over machines; 0.0 for local and qemu
    timings: dict[str, float] = field(default_factory=dict)  # seconds: lock, stage, launch, ready, task, total
    cluster: str = ""
    outputs: dict[str, MachineOutput] = field(default_factory=dict)
    """Each machine's exit code by short id (``m0``), with its stdout and stderr when run with ``capture=True``."""

    @property
    def failed(self) -> list[str]:
        """The machines whose task did not exit 0."""
        return [mid for mid, out in self.outputs.items() if out.exit_code != 0]


def run_command(
    argv: Sequence[str],
    options: LaunchOptions,
    output: TextIO | None = None,
    error_output: TextIO | None = None,
    *,
    torchrun: bool = False,
    capture: bool = False,
    sync: bool = True,
) -> RunResult:
    """Run ``argv`` on the machines of ``options.cluster`` when that cluster exists (sending them the project files
    that changed first, unless ``sync`` is False), else on fresh ones, as one gang job (``rawvm.gang``: ranks,
    peers, all or nothing; ``torchrun`` wraps each node's command in ``torchrun``). Ctrl-C cancels the tasks
    (``rawvm.runs``); a second one stops the machines."""
    out = output if output is not None else sys.stdout
    err = error_output if error_output is not None else sys.stderr
    command = check_command(argv)
    started = time.monotonic()
    warm = bool(options.cluster and clusters.exists(options.cluster))
    if warm:
        record = clusters.load(str(options.cluster))
        # machines that were up already answer at once; a short wait tells a stopped cluster quickly
        launched = Launched(provider=provider_of(record), record=record, timings={}, ready_timeout_s=30.0)
    else:
        from rawvm.launch import launch  # a cold run only: a warm one needs none of the launch's modules

        launched = launch(options)
    record = launched.record
    project = (options.environment.project_dir or Path.cwd()).resolve()
    plan = RunPlan(command, options.task_env, capture=capture, torchrun=torchrun)
    if warm and options.environment.compile_bytecode:  # an install setting: the machines were set up at launch
        say(f"--compile-bytecode: ignored, {record.name}'s machines keep the install settings of their launch")
    if warm and sync and record.project and Path(record.project) != project:
        say(f"sync: skipped, {project} is not the project {record.name} was launched from ({record.project})")
    elif warm and sync:  # the files and the environment as they are here now, not as they were at 'up'
        environment = options.environment
        if environment.source is None and record.source:  # no --from: the one the cluster was locked from
            environment = dataclasses.replace(environment, source=record.source, pypi_only=record.pypi_only)
        plan = dataclasses.replace(plan, sync_from=project, relock=environment)
    try:
        outcome = run_on_cluster(launched, plan, out, err)
    except KeyboardInterrupt:  # outside the run's own handler (no main thread, or between its steps)
        with contextlib.suppress(RawvmError):
            cancel(record.name)  # what the handler would have done: the tasks must not run on unseen
        outcome = RunOutcome(interrupts=1)
    timings = {**launched.timings, **outcome.timings, "total": time.monotonic() - started}
    cost = 0.0 if record.provider in FREE_PROVIDERS else costs.cost_of(record, time.time())
    result = RunResult(outcome.exit_code, record.machines, cost, timings, record.name, outcome.outputs)
    if outcome.interrupts >= 2:
        count = down(record.name)
        say(f"cancelled; stopped {count} machine{'s' if count != 1 else ''} of {record.name}")
    elif outcome.interrupts:
        say(f"cancelled; {stops_line(record)}")
    else:
        failed = "".join(f"; {mid} failed ({result.outputs[mid].exit_code})" for mid in result.failed)
        summary = f"exit code {result.exit_code} after {timings['total']:.1f} s{failed}"
        say(f"{summary}; {costs.cost_line(record, cost)}; {stops_line(record)}")
    return result


def up(options: LaunchOptions) -> clusters.ClusterRecord:
    """Launch machines and wait until every one is ready (each handed the options' variables and secrets for
    its later tasks); returns the cluster's record."""
    from rawvm.launch import launch

    launched = launch(options)
    ready_or_fail(launched, options.task_env)
    return launched.record


@dataclass
class ClusterView:
    name: str
    provider: str
    created: float
    machines: list[dict[str, Any]]
    price_per_hour: float  # USD/hour of every machine of the record (0 when free or unknown)
    cost_so_far: float = 0.0  # USD since launch, each machine at most its lifetime
    price_unknown: bool = False  # some machine of a billed provider has no known price

    @property
    def running(self) -> int:
        return sum(1 for m in self.machines if m["state"] not in {"terminated", "stopped", "gone"})


def ls() -> list[ClusterView]:
    """Every recorded cluster with each machine's state as its provider sees it. Clusters whose machines are
    all gone (they stopped by themselves) are forgotten."""
    views = []
    providers: dict[str, Provider] = {}
    for record in clusters.all_records():
        key = json.dumps([record.provider, record.provider_options], sort_keys=True)
        provider = providers[key] if key in providers else providers.setdefault(key, provider_of(record))
        try:
            known = {m.id: m.state for m in provider.list(record.name)}
        except RawvmError:
            known = None
        machines = [
            {
                "id": m.id,
                "state": (known.get(m.id, "gone") if known is not None else "unknown"),
                "agent_url": m.agent_url,
                "instance_type": m.instance_type,
                "price_per_hour": known_price(record.provider, m.price_per_hour),
                "boot_phases": dict(m.boot_phases),
            }
            for m in record.machines
        ]
        view = ClusterView(
            record.name,
            record.provider,
            record.created,
            machines,
            record.price_per_hour,
            cost_so_far=costs.cost_of(record, time.time()),
            price_unknown=costs.price_unknown(record),
        )
        if known is not None and view.running == 0 and time.time() - record.created > 60:
            # Its machines stopped by themselves; release what was made for the cluster (aws: security group,
            # launch template; qemu: state files) before forgetting it, or nothing would ever clean those up.
            try:
                provider.down(record.name)
            except RawvmError as exc:
                say(f"{record.name}: its machines are gone but cleaning up failed ({exc}); try 'rawvm down'")
                views.append(view)
                continue
            clusters.remove(record.name)
            continue
        views.append(view)
    return views


def known_price(provider: str, price: float) -> float | None:
    """A price as ``--json`` gives it: USD (0.0 on a free provider), or None where none could be had -- never a
    0.0 or a word that stands for "unknown"."""
    if provider in FREE_PROVIDERS:
        return 0.0
    return price if price > 0 else None


def ls_json(views: Sequence[ClusterView]) -> str:
    """Every cluster as JSON; a cluster's price and cost are null when some machine's price is unknown (a sum
    over the known ones would pass for the whole)."""
    rows = []
    for v in views:
        unknown = v.provider not in FREE_PROVIDERS and (v.price_unknown or not v.price_per_hour)
        row = {**dataclasses.asdict(v), "running": v.running}
        if unknown:
            row.update(price_per_hour=None, cost_so_far=None)
        rows.append(row)
    return json.dumps(rows, indent=2, sort_keys=True)


async def machine_logs(
    mid: str, client: AgentClient, prefix: str, follow: bool, output: TextIO, error_output: TextIO
) -> bool:
    """Print one machine's latest task output; False when its agent does not answer (stopped?)."""
    try:
        tasks = await client.tasks()
    except AgentError:
        return False
    if not tasks:
        say(f"{mid}: no task yet")
        return True
    last = str(max(tasks, key=lambda t: float(t.get("started_at") or 0))["id"])

    await stream_task(client, last, prefix, output, error_output, follow=follow)
    return True


async def all_logs(record: clusters.ClusterRecord, follow: bool, output: TextIO, error_output: TextIO) -> int:
    """Every machine's latest task output; stopped machines from their flushes. 1 when none answered."""
    many = len(record.machines) > 1
    async with agent_session() as session:
        agents = clients(record, session)
        answered = await asyncio.gather(
            *(
                machine_logs(mid, client, f"[{mid}] " if many else "", follow, output, error_output)
                for mid, client in agents.items()
            )
        )
    stopped = [mid for mid, ok in zip(agents, answered, strict=True) if not ok]
    if stopped and print_stopped(record, stopped, many, output, error_output):
        return 0
    return 0 if any(answered) else 1


def print_stopped(
    record: clusters.ClusterRecord, stopped: Sequence[str], many: bool, output: TextIO, error_output: TextIO
) -> bool:
    """The flushed output of the machines whose agents did not answer; False when none was shown.

    A flush is named after its agent's label: the machine id on local and qemu, but the host name on EC2 (every
    machine there shares one agent.toml), which the record does not know. So flushes that name no recorded
    machine are shown too, under their own name: they come from machines that have stopped."""
    sinks.fetch_flushes(record.name, provider_of(record))
    flushed = sinks.flushed_machines(record.name)
    known = {m.short_id for m in record.machines}
    unnamed = [mid for mid in flushed if mid not in known]
    many = many or len(unnamed) > 1
    shown = False
    for mid in [m for m in stopped if m in flushed] + unnamed:
        shown = sinks.print_flushed_logs(record.name, mid, f"[{mid}] " if many else "", output, error_output) or shown
    if not unnamed:
        for mid in stopped:
            if mid not in flushed:
                say(f"{mid}: its agent does not answer (stopped?) and it has flushed no logs to the sink yet")
    return shown


def logs(cluster: str, *, follow: bool = False, output: TextIO | None = None) -> int:
    """Print the output of the latest task on each machine of ``cluster``; ``follow`` until it ends.

    Machines that have stopped, and clusters already forgotten, answer from the logs they flushed to their sink
    (fetched first from the provider's sink, for qemu and aws)."""
    out = output or sys.stdout
    if not clusters.exists(cluster):
        name = clusters.check_name(cluster)
        sinks.fetch_flushes(name, sinks.remembered_provider(name))
        if mids := sinks.flushed_machines(name):
            many = len(mids) > 1
            shown = [sinks.print_flushed_logs(name, mid, f"[{mid}] " if many else "", out, sys.stderr) for mid in mids]
            return 0 if any(shown) else 1
    record = clusters.load(cluster)
    return run_sync(all_logs(record, follow, out, sys.stderr))


def down(cluster: str) -> int:
    """Stop every machine of ``cluster`` now and forget it; returns how many were running."""
    record = clusters.load(cluster)
    provider = provider_of(record)
    running = sum(1 for m in provider.list(record.name) if m.state not in {"terminated", "stopped"})
    with contextlib.suppress(RawvmError):
        run_sync(shutdown_all(record))  # ask first: a stopping agent flushes its logs to the sink
    stopped = provider.down(record.name)
    clusters.remove(record.name)
    return max(running, stopped)


FLUSH_WAIT_S = 60.0


async def shutdown_all(record: clusters.ClusterRecord, flush_wait: float = FLUSH_WAIT_S) -> None:
    """Ask every agent to stop, then give each up to ``flush_wait`` to flush its logs and telemetry to the sink
    (phase ``off``, or no answer any more) before the provider ends the machines: ending them at once lost it."""
    async with agent_session() as session:
        clients = [AgentClient.for_cluster(record, m.agent_url, session=session, timeout=5) for m in record.machines]
        asked = []
        for client in clients:
            with contextlib.suppress(AgentError):
                await client.shutdown()
                asked.append(client)

        async def flushed(client: AgentClient) -> None:
            deadline = time.monotonic() + flush_wait
            while time.monotonic() < deadline:
                try:
                    if (await client.status()).get("phase") == "off":
                        return
                except AgentError:
                    return  # gone: it flushed and exited
                await asyncio.sleep(POLL_S)

        await asyncio.gather(*(flushed(c) for c in asked))
