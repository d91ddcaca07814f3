"""The numbers of ``rawvm report``: every telemetry sample of a cluster as dataframes (polars), and a summary.

Samples come from the flushes in the sink (``rawvm.sinks.sink_dir``: what a machine sent as it stopped, so a report
works after the machines are gone; the provider's ``fetch_sink`` brings qemu's and EC2's first) and, for
machines still running, from their agents (``/v1/samples``, paged by ``seq``). The same ``seq`` from both is
one sample. Task start and end come from the flushed ``tasks/*/task.json`` and the agents' ``/v1/tasks``.

How time is counted: each sample stands for the time until the machine's next sample, unless that gap is
longer than ``GAP_FACTOR`` typical intervals (the machine or its agent was down): then, like the last sample,
it stands for one typical interval (the machine's median spacing). A GPU sample is idle when its utilization
is below the agent's own idle threshold (``IdleConfig.gpu_threshold``, 5 %); an idle GPU-hour costs its
machine's hourly price divided by the machine's GPU count. A price the record does not know is "unknown",
never guessed.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import msgpack
from rawvm_agent.batch_results import read_results
from rawvm_agent.config import IdleConfig
from rawvm_agent.telemetry.collectors.gpm import METRICS as GPM_METRICS

from rawvm.errors import RawvmError, UsageError
from rawvm.providers import FREE_PROVIDERS
from rawvm.providers.base import short_id

if TYPE_CHECKING:
    import polars as pl

    from rawvm.agent.client import AgentClient
    from rawvm.clusters import ClusterRecord

GAP_FACTOR = 3.0
IDLE_GPU_PERCENT = IdleConfig().gpu_threshold
GPU_FIELDS = (
    ("utilization_gpu_percent", "util_percent"),
    ("memory_used_bytes", "memory_used_bytes"),
    ("memory_total_bytes", "memory_total_bytes"),
    ("power_watts", "power_watts"),
    ("temperature_celsius", "temperature_celsius"),
    ("sm_clock_hertz", "sm_clock_hertz"),
)
# The GPM collector's profiling fields (tensor/SM/DRAM activity in %, PCIe and NVLink bytes per second), joined to
# each GPU's row by index; a field no GPU of the report has is left out of the CSV rather than a column of blanks.
PROFILING_FIELDS = tuple(GPM_METRICS)
EXTRA_HINT = "rawvm report needs its plotting and dataframe libraries: pip install 'rawvm[report]'"


def need_polars() -> Any:
    try:
        import polars
    except ImportError:
        raise UsageError(EXTRA_HINT) from None
    return polars


@dataclass
class TaskMark:
    machine: str
    task_id: str
    argv: list[str]
    started_at: float | None
    ended_at: float | None
    exit_code: int | None
    batch_id: int | None = None  # the batch task id this agent task ran (from the machine's batch results)
    value: str | None = None  # and its value (--map-over-*), when it has one

    @property
    def label(self) -> str:
        """How plots name the task: a batch task by its id and value (every task of a batch has the same
        command), any other by its command."""
        if self.batch_id is None:
            return " ".join(self.argv)
        return f"#{self.batch_id}" + (f" {self.value}" if self.value is not None else "")


@dataclass
class ClusterTelemetry:
    """Everything a report draws from, per machine: samples by seq, tasks by id, and the hourly price."""

    cluster: str
    samples: dict[str, dict[int, dict[str, Any]]] = field(default_factory=dict)
    tasks: dict[str, dict[str, TaskMark]] = field(default_factory=dict)
    prices: dict[str, float | None] = field(default_factory=dict)
    default_price: float | None = None  # for machines the record does not name (e.g. EC2 host names)
    sources: dict[str, set[str]] = field(default_factory=dict)  # machine -> {"sink", "agent"}
    batch_tasks: dict[tuple[str, str], tuple[int, str | None]] = field(default_factory=dict)  # (machine, task)
    launched: set[str] = field(default_factory=set)  # every machine this host launched for it (``launched_machines``)

    def add_batch_result(self, machine: str, result: dict[str, Any], argv: list[str] | None = None) -> None:
        """Which agent tasks ran batch task ``result["id"]`` (one per attempt), for the task marks' labels; an
        attempt with no record of its own (it printed nothing: the agent wrote no task directory) gets its mark
        from the result, with the batch's command ``argv``."""
        value = result.get("value")
        for attempt in result.get("attempts") or []:
            if isinstance(attempt, dict) and attempt.get("task"):
                key = (machine, str(attempt["task"]))
                self.batch_tasks[key] = (int(result["id"]), None if value is None else str(value))
                if key[1] not in self.tasks.get(machine, {}):  # a task.json, when there is one, says more
                    self.add_task(machine, {**attempt, "id": attempt["task"], "argv": argv or []})

    def add_samples(self, machine: str, samples: Iterable[dict[str, Any]], source: str) -> None:
        mine = self.samples.setdefault(machine, {})
        for sample in samples:
            if isinstance(sample, dict) and isinstance(sample.get("seq"), int) and "t" in sample:
                mine[sample["seq"]] = sample
        self.sources.setdefault(machine, set()).add(source)

    def add_task(self, machine: str, record: dict[str, Any]) -> None:
        mark = TaskMark(
            machine=machine,
            task_id=str(record.get("id", "")),
            argv=[str(a) for a in record.get("argv", [])],
            started_at=record.get("started_at") or None,
            ended_at=record.get("ended_at") or None,
            exit_code=record.get("exit_code"),
        )
        self.tasks.setdefault(machine, {})[mark.task_id] = mark

    def price(self, machine: str) -> float | None:
        return self.prices.get(machine, self.default_price)

    def task_marks(self) -> list[TaskMark]:
        marks = sorted((t for tasks in self.tasks.values() for t in tasks.values()), key=lambda t: t.started_at or 0.0)
        for mark in marks:
            if (known := self.batch_tasks.get((mark.machine, mark.task_id))) is not None:
                mark.batch_id, mark.value = known
        return marks


# -- reading ----------------------------------------------------------------------------------------------------


def _batch_argv(spec: Path) -> list[str]:
    """The batch's command, from a flushed copy of its spec; [] when there is none."""
    with contextlib.suppress(OSError, ValueError):
        raw = json.loads(spec.read_bytes())
        if isinstance(raw, dict) and isinstance(raw.get("argv"), list):
            return [str(a) for a in raw["argv"]]
    return []


def read_frames(path: Path) -> Iterator[dict[str, Any]]:
    """The sample frames of one telemetry segment; a torn tail (a crash mid-write) ends it quietly."""
    with path.open("rb") as f:
        unpacker = msgpack.Unpacker(f, raw=False, strict_map_key=False)
        with contextlib.suppress(msgpack.UnpackException, ValueError):
            yield from unpacker


def read_flush(telemetry: ClusterTelemetry, machine: str, flush: Path) -> None:
    for segment in sorted((flush / "telemetry").glob("samples-*.msgpack")):
        telemetry.add_samples(machine, read_frames(segment), "sink")
    for task_json in sorted(flush.glob("tasks/*/task.json")):
        with contextlib.suppress(OSError, ValueError):
            record = json.loads(task_json.read_text())
            if isinstance(record, dict):
                telemetry.add_task(machine, record)
    argv = _batch_argv(flush / "batch" / "spec.json")
    for result in read_results(flush / "batch" / "results"):
        telemetry.add_batch_result(machine, result, argv)


async def _read_agent(agent: AgentClient) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Every sample the agent still holds (paged by seq) and its tasks."""
    samples: list[dict[str, Any]] = []
    after = -1
    while True:
        page = msgpack.unpackb(await agent.packed_samples(after=after, limit=3600), raw=False, strict_map_key=False)
        if not page:
            break
        samples.extend(page)
        after = int(page[-1]["seq"])
    tasks = await agent.tasks()
    return samples, tasks if isinstance(tasks, list) else []


async def read_agents(telemetry: ClusterTelemetry, record: ClusterRecord, timeout: float = 10.0) -> list[str]:
    """Samples and tasks from every agent that answers; the machines that did."""
    from rawvm.agent.client import AgentClient, agent_session

    answered: list[str] = []
    async with agent_session(connections=32) as session:

        def client(url: str) -> AgentClient:
            return AgentClient.for_cluster(record, url, session=session, timeout=timeout, connect_timeout=3.0)

        machines = [(short_id(m.id, record.name), client(m.agent_url)) for m in record.machines if m.agent_url]
        # Tolerant: an agent that fails in any way is left out; the sink has what it flushed.
        results = await asyncio.gather(*(_read_agent(agent) for _, agent in machines), return_exceptions=True)
    for (machine, _), result in zip(machines, results, strict=True):
        if isinstance(result, BaseException):
            continue  # stopped (its flush is in the sink) or unreachable
        samples, tasks = result
        telemetry.add_samples(machine, samples, "agent")
        for task in tasks:
            telemetry.add_task(machine, task)
        answered.append(machine)
    return answered


def launched_machines(cluster: str, record: ClusterRecord | None, provider: str) -> set[str]:
    """The machines this host launched for ``cluster``: its record's and every batch round's, so that a machine
    that ran but left no telemetry (killed before it flushed anything) is still counted. Only where a flush is
    named after its machine (local, qemu; EC2 machines flush under their host name)."""
    from rawvm.files import records_dir

    if provider not in ("local", "qemu"):
        return set()
    names = {short_id(m.id, cluster) for m in record.machines} if record is not None else set()
    with contextlib.suppress(OSError, ValueError, TypeError, KeyError):
        rounds = json.loads((records_dir(cluster) / "batch.json").read_text())["rounds"]  # rawvm.batches' record
        names |= {str(m) for r in rounds for m in r["machines"]}
    return names


def collect(cluster: str, *, live: bool = True) -> ClusterTelemetry:
    """The cluster's telemetry from the sink (fetched from the provider first) and, with ``live``, its agents."""
    from rawvm import clusters, sinks
    from rawvm.observe.top import price_of
    from rawvm.session import provider_of, run_sync

    name = clusters.check_name(cluster)
    record = clusters.load(name) if clusters.exists(name) else None
    provider = provider_of(record) if record is not None else sinks.remembered_provider(name)
    sinks.fetch_flushes(name, provider)
    telemetry = ClusterTelemetry(cluster=name)
    telemetry.launched = launched_machines(name, record, provider.name if provider is not None else "")
    for machine, flushes in sinks.flushes(name).items():
        for flush in flushes:
            read_flush(telemetry, machine, flush)
    if record is not None:
        telemetry.prices = {short_id(m.id, name): price_of(record, m.price_per_hour) for m in record.machines}
        # EC2 flushes are named after the host, not the instance: when every machine has the same known price
        # (one instance type), a host-named flush costs that too; otherwise its price is unknown.
        known = {p for p in telemetry.prices.values() if p is not None}
        same = known.pop() if len(known) == 1 and None not in telemetry.prices.values() else None
        telemetry.default_price = 0.0 if record.provider in FREE_PROVIDERS else same
        if live:
            run_sync(read_agents(telemetry, record))
    elif provider is not None and provider.name in FREE_PROVIDERS:
        telemetry.default_price = 0.0
    if not any(telemetry.samples.values()):
        raise RawvmError(
            f"no telemetry for cluster {name}: nothing flushed to {sinks.sink_dir(name)} and no agent answered"
        )
    return telemetry


# -- dataframes -------------------------------------------------------------------------------------------------


def _net_totals(network: Any) -> tuple[int | None, int | None]:
    if not isinstance(network, dict):
        return None, None
    rx = sum(int(c.get("receive_bytes", 0)) for n, c in network.items() if n != "lo" and isinstance(c, dict))
    tx = sum(int(c.get("transmit_bytes", 0)) for n, c in network.items() if n != "lo" and isinstance(c, dict))
    return rx, tx


def _root_fs(disk: Any) -> tuple[int | None, int | None]:
    from rawvm.observe.top import root_filesystem

    return root_filesystem(disk) if isinstance(disk, dict) else (None, None)


def sample_rows(telemetry: ClusterTelemetry) -> tuple[dict[str, list[Any]], dict[str, list[Any]]]:
    """Column lists: one row per machine sample, and one per GPU per sample."""
    rows: dict[str, list[Any]] = {
        k: []
        for k in (
            "machine",
            "seq",
            "t",
            "cpu_percent",
            "memory_used_bytes",
            "memory_total_bytes",
            "disk_used_bytes",
            "disk_size_bytes",
            "net_receive_bytes",
            "net_transmit_bytes",
            "load1",
            "gpu_count",
        )
    }
    gpu_rows: dict[str, list[Any]] = {k: [] for k in ("machine", "seq", "t", "gpu", "uuid", "name")}
    for column in (*(c for _, c in GPU_FIELDS), *PROFILING_FIELDS):
        gpu_rows[column] = []
    for machine in sorted(telemetry.samples):
        for seq in sorted(telemetry.samples[machine]):
            s = telemetry.samples[machine][seq]
            cpu, memory, load = s.get("cpu"), s.get("memory"), s.get("load")
            gpus = [g for g in s.get("gpu") or [] if isinstance(g, dict)]
            profiling = {p.get("index"): p for p in s.get("gpu_profiling") or [] if isinstance(p, dict)}
            rows["machine"].append(machine)
            rows["seq"].append(seq)
            rows["t"].append(float(s["t"]))
            rows["cpu_percent"].append(float(cpu["percent"]) if isinstance(cpu, dict) and "percent" in cpu else None)
            rows["memory_used_bytes"].append(memory.get("used_bytes") if isinstance(memory, dict) else None)
            rows["memory_total_bytes"].append(memory.get("total_bytes") if isinstance(memory, dict) else None)
            used, size = _root_fs(s.get("disk"))
            rows["disk_used_bytes"].append(used)
            rows["disk_size_bytes"].append(size)
            rx, tx = _net_totals(s.get("network"))
            rows["net_receive_bytes"].append(rx)
            rows["net_transmit_bytes"].append(tx)
            rows["load1"].append(float(load["load1"]) if isinstance(load, dict) and "load1" in load else None)
            rows["gpu_count"].append(len(gpus))
            for g in gpus:
                gpu_rows["machine"].append(machine)
                gpu_rows["seq"].append(seq)
                gpu_rows["t"].append(float(s["t"]))
                gpu_rows["gpu"].append(int(g.get("index", 0)))
                gpu_rows["uuid"].append(str(g.get("uuid", "")))
                gpu_rows["name"].append(str(g.get("name", "")))
                for key, column in GPU_FIELDS:
                    value = g.get(key)
                    gpu_rows[column].append(float(value) if value is not None else None)
                prof = profiling.get(g.get("index"), {})
                for key in PROFILING_FIELDS:
                    value = prof.get(key)
                    gpu_rows[key].append(float(value) if isinstance(value, int | float) else None)
    return rows, gpu_rows


@dataclass
class Frames:
    machines: pl.DataFrame  # one row per machine sample, with dt_s (the time it stands for)
    gpus: pl.DataFrame  # one row per GPU per sample, with dt_s


def frames(telemetry: ClusterTelemetry) -> Frames:
    pl = need_polars()
    rows, gpu_rows = sample_rows(telemetry)
    machines = pl.DataFrame(
        rows,
        schema={
            "machine": pl.String,
            "seq": pl.Int64,
            "t": pl.Float64,
            "cpu_percent": pl.Float64,
            "memory_used_bytes": pl.Int64,
            "memory_total_bytes": pl.Int64,
            "disk_used_bytes": pl.Int64,
            "disk_size_bytes": pl.Int64,
            "net_receive_bytes": pl.Int64,
            "net_transmit_bytes": pl.Int64,
            "load1": pl.Float64,
            "gpu_count": pl.Int64,
        },
    ).sort("machine", "t")
    gap = pl.col("t").shift(-1).over("machine") - pl.col("t")
    typical = (pl.col("t").diff().over("machine")).median().over("machine").fill_null(1.0)
    elapsed = pl.col("t").diff().over("machine")
    machines = (
        machines.with_columns(_gap=gap, _typical=typical)
        .with_columns(
            dt_s=pl.when(pl.col("_gap") <= GAP_FACTOR * pl.col("_typical"))
            .then(pl.col("_gap"))
            .otherwise(pl.col("_typical")),
            net_receive_bytes_per_s=(pl.col("net_receive_bytes").diff().over("machine") / elapsed).clip(0),
            net_transmit_bytes_per_s=(pl.col("net_transmit_bytes").diff().over("machine") / elapsed).clip(0),
        )
        .drop("_gap", "_typical")
    )
    gpu_schema = {
        "machine": pl.String,
        "seq": pl.Int64,
        "t": pl.Float64,
        "gpu": pl.Int64,
        "uuid": pl.String,
        "name": pl.String,
        **{column: pl.Float64 for _, column in GPU_FIELDS},
        **{column: pl.Float64 for column in PROFILING_FIELDS},
    }
    gpus = pl.DataFrame(gpu_rows, schema=gpu_schema).join(
        machines.select("machine", "seq", "dt_s"), on=["machine", "seq"], how="left"
    )
    return Frames(machines=machines, gpus=gpus.sort("machine", "gpu", "t"))


def wide(f: Frames) -> pl.DataFrame:
    """The raw series, one row per machine sample, GPU fields as ``gpu<N>_<field>`` columns (parquet, csv)."""
    pl = need_polars()
    out = f.machines
    if f.gpus.height:
        present = [c for c in PROFILING_FIELDS if f.gpus.get_column(c).null_count() < f.gpus.height]
        columns = [c for _, c in GPU_FIELDS] + present
        pivoted = f.gpus.pivot(on="gpu", index=["machine", "seq"], values=columns, aggregate_function="first")
        renamed = {}
        for column in pivoted.columns:
            if column in ("machine", "seq"):
                continue
            # polars names pivoted columns "<value>_<gpu>" when there are several value columns
            value, _, gpu = column.rpartition("_")
            renamed[column] = f"gpu{gpu}_{value}"
        pivoted = pivoted.rename(renamed)
        ordered = sorted(renamed.values(), key=lambda c: (int(c[3:].split("_", 1)[0]), c))
        out = out.join(pivoted.select("machine", "seq", *ordered), on=["machine", "seq"], how="left")
    return out.with_columns(pl.from_epoch((pl.col("t") * 1000).cast(pl.Int64), time_unit="ms").alias("time"))
