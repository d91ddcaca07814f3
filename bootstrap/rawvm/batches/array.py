"""Batch arrays: ``rawvm.batch(...)`` and ``rawvm batch run|status|logs|retry`` (see docs/architecture.md).

The one launch path (``rawvm.launch.launch``) with the batch spec staged beside the bundle and named in every
machine's agent.toml: each machine runs its static share by itself, so a detached batch still completes. On
this host the batch record (spec, rounds, launch options) lives in the cluster's laptop-only records
(``files.records_dir(cluster)/batch.json``, never beside the flushes machines send), so status and logs work after
the machines and the cluster record are gone.

A task with no result is ``lost`` once the machine that held it is gone; ``retry`` reruns exactly the lost and
failed ids on fresh machines of the same cluster (a new round).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from rawvm_agent.batch import BatchSpec, share_of
from rawvm_agent.config import AgentConfig, BatchConfig

from rawvm import clusters, sinks
from rawvm.agent.client import AgentClient, AgentError, agent_session
from rawvm.batches import plan as batch_plan
from rawvm.batches.results import BatchStatus, newest, sink_results, sink_task_dir
from rawvm.commands import down
from rawvm.errors import RawvmError, UsageError
from rawvm.files import records_dir, sha256_file, write_private_json
from rawvm.launch import LaunchExtras, launch
from rawvm.options import LaunchOptions, check_command, parse_duration_flag
from rawvm.providers.base import Provider
from rawvm.session import Launched, StreamWriter, provider_of, run_sync, say, stream_task

SPEC_FILE = "rawvm-batch.json"
RECORD_FILE = "batch.json"
FINAL_STATES = ("done", "failed")
DEFAULT_KEEPALIVE = "2m"


# -- the record on this host -------------------------------------------------------------------------------


@dataclass
class BatchRecord:
    cluster: str
    spec: dict[str, Any]  # the first round's spec: every id and value
    rounds: list[dict[str, Any]] = field(default_factory=list)  # each {"spec": ..., "machines": [short ids]}
    launch: dict[str, Any] = field(default_factory=dict)  # provider options, for a retry's fresh machines
    created: float = field(default_factory=time.time)

    @property
    def ids(self) -> list[int]:
        return [int(i) for i in self.spec["ids"]]

    def owners(self) -> dict[int, str]:
        """Which machine holds each id under the static shares, the latest round winning."""
        owner: dict[int, str] = {}
        for round_ in self.rounds:
            spec, machines = round_["spec"], round_["machines"]
            for index, mid in enumerate(machines):
                for bid in share_of(spec["ids"], int(spec["machines"]), index):
                    owner[int(bid)] = mid
        return owner


def record_path(cluster: str) -> Path:
    """The batch record: in the cluster's laptop-only records (0700), never beside its flushes, which machines
    make: a flush cannot replace the argv or launch options a retry runs."""
    return records_dir(cluster) / RECORD_FILE


def save_record(record: BatchRecord) -> None:
    write_private_json(record_path(record.cluster), dataclasses.asdict(record))


def load_record(cluster: str) -> BatchRecord:
    """The batch record, its spec and launch options checked as when they were made (a damaged or edited record
    is refused, not half-used)."""
    name = clusters.check_name(cluster)
    try:
        raw = json.loads(record_path(name).read_text())
        record = BatchRecord(**raw)
        BatchSpec.from_json(record.spec)
        LaunchOptions.from_json(record.launch)
    except FileNotFoundError:
        raise RawvmError(f"no batch named {cluster!r} here: see 'rawvm ls'") from None
    except (ValueError, TypeError, KeyError, AttributeError, UsageError) as exc:
        raise RawvmError(f"the batch record of {cluster!r} ({record_path(name)}) is damaged: {exc}") from None
    return record


# -- results: from the sink and from live agents ------------------------------------------------------------


async def poll_agents(record: clusters.ClusterRecord, timeout: float = 5.0) -> dict[str, dict[str, Any]]:
    """Each answering machine's batch status and results: ``{mid: {"status": ..., "results": [...]}}``."""
    async with agent_session() as session:

        async def one(mid: str, url: str) -> tuple[str, dict[str, Any] | None]:
            client = AgentClient.for_cluster(record, url, session=session, timeout=timeout)
            try:
                return mid, {
                    "status": await client.batch_status(),
                    "results": (await client.batch_results())["results"],
                }
            except AgentError:
                return mid, None

        answers = await asyncio.gather(*(one(m.short_id, m.agent_url) for m in record.machines))
    return {mid: answer for mid, answer in answers if answer is not None}


def _alive_silent(record: clusters.ClusterRecord, answering: set[str]) -> set[str]:
    """Machines that do not answer but that their provider still runs (booting, or busy past the timeout)."""
    provider = provider_of(record)
    silent = [m for m in record.machines if m.short_id not in answering]
    if not silent:
        return set()
    try:
        running = {m.id for m in provider.list(record.name) if m.state in {"pending", "running"}}
    except RawvmError:
        return {m.short_id for m in silent}  # unknown: do not call their tasks lost
    return {m.short_id for m in silent if m.id in running and provider.alive(m)}


def status(cluster: str) -> BatchStatus:
    """Every id's state, from the sink and from whichever machines still answer."""
    brec = load_record(cluster)
    sinks.fetch_flushes(brec.cluster, sinks.remembered_provider(brec.cluster))
    results = sink_results(brec.cluster)
    live: dict[str, dict[str, Any]] = {}
    silent: set[str] = set()
    if clusters.exists(brec.cluster):
        crec = clusters.load(brec.cluster)
        live = run_sync(poll_agents(crec))
        silent = _alive_silent(crec, set(live))
    return merge_status(brec, results, live, silent)


def merge_status(
    brec: BatchRecord, results: dict[int, dict[str, Any]], live: dict[str, dict[str, Any]], silent: set[str]
) -> BatchStatus:
    running: dict[int, tuple[str, str]] = {}
    queued: set[int] = set()
    owners = brec.owners()
    for mid, answer in live.items():
        for result in answer["results"]:
            results[int(result["id"])] = newest(results.get(int(result["id"])), result)
        st = answer["status"]
        if st.get("machines"):
            queued.update(int(i) for i in st.get("queued", []))
            running.update({int(k): (mid, str(v)) for k, v in dict(st.get("running", {})).items()})
        elif not st.get("error"):  # still installing: its whole share waits
            queued.update(i for i, owner in owners.items() if owner == mid)
    states: dict[int, str] = {}
    for bid in brec.ids:
        if bid in results:
            states[bid] = str(results[bid]["state"])
        elif bid in running:
            states[bid] = "running"
        elif bid in queued or owners.get(bid) in silent:
            states[bid] = "queued"
        else:
            states[bid] = "lost"
    return BatchStatus(brec.cluster, states, results, running, sorted(live))


# -- logs ---------------------------------------------------------------------------------------------------


def logs(cluster: str, task: int, *, output: TextIO | None = None, error_output: TextIO | None = None) -> int:
    """Print task ``task``'s output (its last attempt): from its machine while it answers, else from the sink."""
    out, err = output or sys.stdout, error_output or sys.stderr
    st = status(cluster)
    if task not in st.states:
        raise UsageError(f"batch {cluster} has no task {task}")
    machine, agent_task, printed = "", "", True
    if task in st.running:
        machine, agent_task = st.running[task]
    elif task in st.results:
        attempts = [a for a in st.results[task].get("attempts", []) if a.get("task")]
        agent_task = str(attempts[-1]["task"]) if attempts else ""
        printed = not attempts or attempts[-1].get("output_bytes") != 0  # results from older agents lack it
        machine = str(st.results[task].get("machine", ""))
    if not agent_task:
        say(f"task {task} is {st.states[task]}: no output yet")
        return 0 if st.states[task] in {"queued", "running"} else 1
    if machine.removeprefix(f"{cluster}-") in st.answering and clusters.exists(cluster):
        crec = clusters.load(cluster)
        url = next(m.agent_url for m in crec.machines if m.short_id == machine.removeprefix(f"{cluster}-"))
        run_sync(_live_logs(crec, url, agent_task, out, err))
        return 0
    task_dir = sink_task_dir(cluster, agent_task)
    if task_dir is None and not printed:
        return 0  # it printed nothing: its machine kept no log files for it
    if task_dir is None:
        say(f"task {task} ({st.states[task]}): its machine has gone and its output is not in the sink")
        return 1
    for stream, dest in (("stdout", out), ("stderr", err)):
        writer = StreamWriter(dest, "")  # as the live output: decoded, without control sequences
        with contextlib.suppress(FileNotFoundError):
            writer.write((task_dir / stream).read_bytes())
        writer.close()
    return 0


async def _live_logs(record: clusters.ClusterRecord, url: str, agent_task: str, out: TextIO, err: TextIO) -> None:
    async with AgentClient.for_cluster(record, url) as client:
        await stream_task(client, agent_task, "", out, err, follow=False)


# -- run and retry ------------------------------------------------------------------------------------------


@dataclass
class BatchResult:
    cluster: str
    exit_code: int
    states: dict[int, str]
    results: dict[int, dict[str, Any]]
    timings: dict[str, float] = field(default_factory=dict)

    def ids(self, state: str) -> list[int]:
        return sorted(i for i, s in self.states.items() if s == state)


def write_spec(spec: BatchSpec, directory: Path) -> tuple[Path, str]:
    """The spec as the file staged beside the bundle, and its sha256 (agent.toml carries only the URL and the
    hash, so the user-data stays small however many tasks there are)."""
    path = directory / SPEC_FILE
    path.write_text(json.dumps(spec.to_json(), sort_keys=True))
    return path, sha256_file(path)


def with_batch(agent: AgentConfig, urls: dict[str, str], digest: str) -> AgentConfig:
    return dataclasses.replace(agent, batch=BatchConfig(spec_url=urls[SPEC_FILE], spec_sha256=digest))


def _launch_round(spec: BatchSpec, options: LaunchOptions, before: Sequence[str] = ()) -> Launched:
    """One launch of ``spec.machines`` machines, the spec staged beside the bundle; ``before``: the earlier
    rounds' machines, whose names the new ones do not take again."""
    with tempfile.TemporaryDirectory(prefix="rawvm-batch-") as scratch:
        path, digest = write_spec(spec, Path(scratch))
        extras = LaunchExtras(
            extra_files=((SPEC_FILE, path),),
            amend_agent=lambda agent, urls: with_batch(agent, urls, digest),
            machines_before=tuple(before),
        )
        return launch(options.replace(request=options.request.replace(n=spec.machines)), extras)


def run_batch(
    command: Sequence[str],
    options: LaunchOptions,
    *,
    array: str | None = None,
    map_over_file: str | Path | None = None,
    map_over_values: str | Sequence[str] | None = None,
    tasks_per_machine: int = 0,
    max_retries: int = 2,
    task_timeout: str = "",
    detach: bool = False,
) -> BatchResult:
    """The batch ``rawvm.batch`` describes, on up to ``options.request.n`` machines."""
    argv = check_command(command)
    ids, values = batch_plan.tasks_of(array, map_over_file, map_over_values)
    timeout_s = parse_duration_flag("--task-timeout", task_timeout) if task_timeout else 0.0
    machines = batch_plan.machines_needed(len(ids), options.request.n, tasks_per_machine)
    spec = batch_plan.make_spec(
        argv,
        ids,
        values,
        machines=machines,
        tasks_per_machine=tasks_per_machine,
        max_retries=max_retries,
        task_timeout_s=timeout_s,
        gpu=options.request.gpu,
    )
    # Plain variables travel in the staged spec; secrets by name only, their values over the agent API.
    spec = dataclasses.replace(spec, env=dict(options.task_env.env), secret_env=options.task_env.secret_names)
    return _run_round(spec, options, detach, first=True)


def _run_round(spec: BatchSpec, options: LaunchOptions, detach: bool, first: bool) -> BatchResult:
    from rawvm.batches import watch as batch_watch

    started = time.monotonic()
    before = [] if first else [m for r in load_record(str(options.cluster)).rounds for m in r["machines"]]
    launched = _launch_round(spec, options, before)
    record = launched.record
    name = record.name
    brec = BatchRecord(cluster=name, spec=spec.to_json(), launch=options.to_json()) if first else load_record(name)
    brec.rounds.append({"spec": spec.to_json(), "machines": [m.short_id for m in record.machines]})
    save_record(brec)
    timings = {**launched.timings}
    where = f"{len(spec.ids)} tasks on {len(record.machines)} machine{'s' if len(record.machines) > 1 else ''}"
    if detach:
        run_sync(batch_watch.hand_out_shares(launched, options.task_env))
        say(f"batch {name}: {where}, detached; see 'rawvm batch status {name}'")
        states = dict.fromkeys(spec.ids, "queued")
        return BatchResult(name, 0, states, {}, {**timings, "total": time.monotonic() - started})
    say(f"batch {name}: {where}")
    try:
        results, lost = run_sync(batch_watch.watch(launched, spec, options.task_env))
    except KeyboardInterrupt:  # cancel: queued ids never start, running tasks stop; their output is kept
        from rawvm.runs import cancel

        cancelled = sum(len(ids) for ids in cancel(name).values())
        keep = options.lifetime.keepalive
        say(
            f"cancelled the batch ({cancelled} running task{'s' if cancelled != 1 else ''} stopped, nothing queued "
            f"starts); its machines stop after {keep} idle (now: rawvm down {name})"
        )
        try:
            after = status(name)  # as 'rawvm batch status' shows it: cancelled ids failed ('batch retry' reruns them)
            states, results = after.states, after.results
        except RawvmError:
            states, results = dict.fromkeys(spec.ids, "failed"), {}
        return BatchResult(name, 130, states, results, {**timings, "total": time.monotonic() - started})
    timings["total"] = time.monotonic() - started
    final = status_after(brec, results, lost)
    code = 0 if all(s == "done" for s in final.states.values()) else 1
    batch_watch.summary(final, sys.stderr)
    keep = options.lifetime.keepalive
    say(f"batch {name} ended in {timings['total']:.1f} s; its machines stop after {keep} idle (now: rawvm down {name})")
    return BatchResult(name, code, final.states, final.results, timings)


def status_after(brec: BatchRecord, results: dict[int, dict[str, Any]], lost: set[int]) -> BatchStatus:
    """The end of an attached round: what the watch saw, merged with the sink (earlier rounds)."""
    merged = sink_results(brec.cluster)
    for bid, result in results.items():
        merged[bid] = newest(merged.get(bid), result)
    st = merge_status(brec, merged, {}, set())
    for bid in lost:
        if bid not in merged:
            st.states[bid] = "lost"
    return st


def retry(cluster: str, *, n: int = 0, detach: bool = False) -> BatchResult:
    """Rerun exactly the lost and failed ids of ``cluster`` on fresh machines (a new round of the same cluster).
    The cluster must have no task running or queued; its idle machines are stopped first."""
    st = status(cluster)
    todo = sorted(st.ids("lost") + st.ids("failed"))
    if st.ids("running") or st.ids("queued"):
        busy = len(st.ids("running")) + len(st.ids("queued"))
        raise RawvmError(f"batch {cluster} still has {busy} tasks running or queued: wait, or 'rawvm down {cluster}'")
    if not todo:
        say(f"batch {cluster}: nothing to retry, every task is done")
        return BatchResult(cluster, 0, st.states, st.results)
    brec = load_record(cluster)
    if clusters.exists(cluster):
        with contextlib.suppress(RawvmError):
            down(cluster)  # idle machines of the last round: their results are in the sink already
    _release(brec)
    first = BatchSpec.from_json(brec.spec)
    values = [first.values[first.ids.index(i)] for i in todo] if first.values is not None else None
    machines = batch_plan.machines_needed(len(todo), n or len(brec.rounds[-1]["machines"]), first.tasks_per_machine)
    spec = dataclasses.replace(first, ids=todo, values=values, machines=machines)
    say(f"batch {cluster}: retrying {len(todo)} tasks ({batch_plan.compress_ids(todo)})")
    options = LaunchOptions.from_json(brec.launch).replace(cluster=cluster)
    if missing := [n for n in spec.secret_env if n not in options.task_env.secret_names]:
        raise UsageError(f"the batch's secret {missing[0]} is not set here: export it to retry (secrets are not kept)")
    return _run_round(spec, options, detach, first=False)


def _release(brec: BatchRecord) -> None:
    """What the provider still holds for a cluster whose record is gone (e.g. a killed local machine's dir)."""
    provider: Provider | None = sinks.remembered_provider(brec.cluster)
    if provider is not None and not clusters.exists(brec.cluster):
        with contextlib.suppress(RawvmError):
            provider.down(brec.cluster)
