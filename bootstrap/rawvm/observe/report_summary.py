"""The summary of ``rawvm report``: machine-hours, GPU-hours, utilization, idle GPU time and what it cost.

Computed from report_data's frames; how time and idleness are counted is said there (its module docstring).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from rawvm.observe.report_data import IDLE_GPU_PERCENT, ClusterTelemetry, Frames, need_polars


@dataclass
class MachineSummary:
    machine: str
    hours: float
    gpus: int
    gpu_hours: float
    mean_cpu_percent: float | None
    mean_gpu_util_percent: float | None
    idle_gpu_hours: float
    price_per_hour: float | None

    @property
    def busy_score(self) -> float:
        """What "busy" means for ranking: GPU utilization where there are GPUs, else CPU."""
        value = self.mean_gpu_util_percent if self.gpus else self.mean_cpu_percent
        return value if value is not None else 0.0


@dataclass
class Summary:
    cluster: str
    start: float
    end: float
    machines: list[MachineSummary]
    machine_hours: float
    gpu_hours: float
    mean_gpu_util_percent: float | None
    p95_gpu_util_percent: float | None
    idle_gpu_hours: float
    idle_gpu_cost_usd: float | None  # None: some idle GPU's price is unknown
    cost_usd: float | None
    idle_threshold_percent: float = IDLE_GPU_PERCENT
    silent: list[str] = field(default_factory=list)  # machines that ran and left no telemetry

    @property
    def machine_count(self) -> int:
        return len(self.machines) + len(self.silent)

    def busiest(self, n: int = 3) -> list[MachineSummary]:
        return sorted(self.machines, key=lambda m: (-m.busy_score, m.machine))[:n]

    def idlest(self, n: int = 3) -> list[MachineSummary]:
        return sorted(self.machines, key=lambda m: (m.busy_score, m.machine))[:n]


def _sum_or_unknown(values: Sequence[float | None]) -> float | None:
    return None if any(v is None for v in values) else float(sum(v for v in values if v is not None))


def summarize(telemetry: ClusterTelemetry, f: Frames) -> Summary:
    pl = need_polars()
    per_machine = f.machines.group_by("machine").agg(
        hours=pl.col("dt_s").sum() / 3600,
        mean_cpu=(pl.col("cpu_percent") * pl.col("dt_s")).sum()
        / pl.col("dt_s").filter(pl.col("cpu_percent").is_not_null()).sum(),
        gpus=pl.col("gpu_count").max(),
    )
    util = pl.col("util_percent")
    per_gpu_machine = f.gpus.group_by("machine").agg(
        gpu_hours=pl.col("dt_s").sum() / 3600,
        util_dt=(util * pl.col("dt_s")).sum(),
        util_time=pl.col("dt_s").filter(util.is_not_null()).sum(),
        idle_hours=pl.col("dt_s").filter(util < IDLE_GPU_PERCENT).sum() / 3600,
    )
    joined = per_machine.join(per_gpu_machine, on="machine", how="left").sort("machine")
    machines: list[MachineSummary] = []
    for row in joined.iter_rows(named=True):
        util_time = row["util_time"] or 0.0
        machines.append(
            MachineSummary(
                machine=row["machine"],
                hours=float(row["hours"] or 0.0),
                gpus=int(row["gpus"] or 0),
                gpu_hours=float(row["gpu_hours"] or 0.0),
                mean_cpu_percent=row["mean_cpu"],
                mean_gpu_util_percent=(row["util_dt"] / util_time) if util_time else None,
                idle_gpu_hours=float(row["idle_hours"] or 0.0),
                price_per_hour=telemetry.price(row["machine"]),
            )
        )
    utils = f.gpus.get_column("util_percent").drop_nulls()
    weighted = f.gpus.select(
        util_dt=(util * pl.col("dt_s")).sum(), util_time=pl.col("dt_s").filter(util.is_not_null()).sum()
    ).row(0)
    idle_costs = [
        (m.idle_gpu_hours * m.price_per_hour / m.gpus) if m.price_per_hour is not None else None
        for m in machines
        if m.idle_gpu_hours > 0 and m.gpus
    ]
    costs = [m.hours * m.price_per_hour if m.price_per_hour is not None else None for m in machines]
    t = f.machines.get_column("t")
    return Summary(
        cluster=telemetry.cluster,
        start=float(t.min()),  # type: ignore[arg-type]
        end=float(t.max()),  # type: ignore[arg-type]
        machines=machines,
        machine_hours=sum(m.hours for m in machines),
        gpu_hours=sum(m.gpu_hours for m in machines),
        mean_gpu_util_percent=(weighted[0] / weighted[1]) if weighted[1] else None,
        p95_gpu_util_percent=float(utils.quantile(0.95, interpolation="linear")) if utils.len() else None,  # type: ignore[arg-type]
        idle_gpu_hours=sum(m.idle_gpu_hours for m in machines),
        idle_gpu_cost_usd=_sum_or_unknown(idle_costs),
        cost_usd=_sum_or_unknown(costs),
        silent=sorted(telemetry.launched - {m.machine for m in machines}),
    )
