"""Drawing ``rawvm report``: a self-contained HTML page (summary table, inline SVG plots) or one PNG.

matplotlib draws both from the same code: SVG goes inline into the HTML, so the page needs no script and no
network (the machines' reports are read where there may be none), and PNG needs no browser. Figures are made
with ``matplotlib.figure.Figure`` directly (no pyplot, no global state, no GUI backend). Long series are thinned
to ``MAX_POINTS`` per line for drawing; the parquet/csv output keeps every sample.
"""

from __future__ import annotations

import html
import io
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rawvm.errors import UsageError
from rawvm.observe.report_data import EXTRA_HINT, Frames, Summary, TaskMark

if TYPE_CHECKING:
    from matplotlib.figure import Figure, SubFigure

MAX_POINTS = 1500
GIB = float(1 << 30)


def _need_matplotlib() -> None:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise UsageError(EXTRA_HINT) from None


def _money(value: float | None) -> str:
    return "unknown" if value is None else f"${value:,.2f}"


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}%"


def _utc(t: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(t))


def summary_rows(s: Summary) -> list[tuple[str, str, str]]:
    """(id, label, value): the figures on top of the report, in order."""
    busiest = ", ".join(f"{m.machine} ({m.busy_score:.0f}%)" for m in s.busiest())
    idlest = ", ".join(f"{m.machine} ({m.busy_score:.0f}%)" for m in s.idlest())
    return [
        ("period", "period", f"{_utc(s.start)} to {_utc(s.end)}"),
        ("machines", "machines", str(len(s.machines))),
        ("machine-hours", "machine-hours", f"{s.machine_hours:.3f}"),
        ("gpu-hours", "GPU-hours", f"{s.gpu_hours:.3f}"),
        ("mean-gpu-util", "mean GPU utilization", _pct(s.mean_gpu_util_percent)),
        ("p95-gpu-util", "p95 GPU utilization", _pct(s.p95_gpu_util_percent)),
        ("idle-gpu-hours", f"idle GPU-hours (utilization < {s.idle_threshold_percent:g}%)", f"{s.idle_gpu_hours:.3f}"),
        ("idle-gpu-cost", "cost of the idle GPU-hours", _money(s.idle_gpu_cost_usd)),
        ("cost", "cost (machine-hours at their price)", _money(s.cost_usd)),
        ("busiest", "busiest machines", busiest),
        ("idlest", "idlest machines", idlest),
    ]


def _thin(frame: Any) -> Any:
    n = frame.height
    return frame if n <= MAX_POINTS else frame.gather_every(n // MAX_POINTS + 1)


def _times(frame: Any) -> Any:
    return (frame.get_column("t").to_numpy() * 1000).astype("datetime64[ms]").astype(object)


def _marks(ax: Any, tasks: Sequence[TaskMark], label: bool) -> None:
    import datetime as dt

    for task in tasks:
        for when, color in ((task.started_at, "tab:green"), (task.ended_at, "tab:red")):
            if when:
                ax.axvline(dt.datetime.fromtimestamp(when, dt.UTC).replace(tzinfo=None), color=color, lw=0.8, ls="--")
        if label and task.started_at:
            start = dt.datetime.fromtimestamp(task.started_at, dt.UTC).replace(tzinfo=None)
            ax.annotate(" ".join(task.argv)[:40], (start, 1), xycoords=("data", "axes fraction"), fontsize=7, va="top")


def draw_machine(fig: Figure | SubFigure, machine: str, f: Frames, tasks: Sequence[TaskMark], pl: Any) -> None:
    """One machine over time: CPU, memory, network, and (when it has GPUs) each GPU's utilization/memory/power."""
    rows = _thin(f.machines.filter(pl.col("machine") == machine))
    gpus = f.gpus.filter(pl.col("machine") == machine)
    panels = 6 if gpus.height else 3
    axes = fig.subplots(panels, 1, sharex=True)
    fig.suptitle(f"{machine}", fontsize=10, x=0.01, ha="left")
    x = _times(rows)
    axes[0].plot(x, rows.get_column("cpu_percent").to_numpy(), lw=0.8)
    axes[0].set_ylabel("CPU %", fontsize=8)
    axes[0].set_ylim(0, 105)
    axes[1].plot(x, rows.get_column("memory_used_bytes").to_numpy() / GIB, lw=0.8)
    axes[1].set_ylabel("memory GiB", fontsize=8)
    axes[2].plot(x, rows.get_column("net_receive_bytes_per_s").to_numpy() / 1e6, lw=0.8, label="receive")
    axes[2].plot(x, rows.get_column("net_transmit_bytes_per_s").to_numpy() / 1e6, lw=0.8, label="transmit")
    axes[2].set_ylabel("network MB/s", fontsize=8)
    axes[2].legend(fontsize=6, loc="upper right")
    if gpus.height:
        for index in sorted(set(gpus.get_column("gpu").to_list())):
            one = _thin(gpus.filter(pl.col("gpu") == index))
            gx = _times(one)
            axes[3].plot(gx, one.get_column("util_percent").to_numpy(), lw=0.7, label=f"gpu{index}")
            axes[4].plot(gx, one.get_column("memory_used_bytes").to_numpy() / GIB, lw=0.7)
            axes[5].plot(gx, one.get_column("power_watts").to_numpy(), lw=0.7)
        axes[3].set_ylabel("GPU util %", fontsize=8)
        axes[3].set_ylim(0, 105)
        axes[3].legend(fontsize=6, ncol=8, loc="upper right")
        axes[4].set_ylabel("GPU mem GiB", fontsize=8)
        axes[5].set_ylabel("GPU W", fontsize=8)
    for i, ax in enumerate(axes):
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
        _marks(ax, tasks, label=i == 0)
    axes[-1].set_xlabel("time (UTC)", fontsize=8)


def chosen_machines(s: Summary, limit: int) -> list[str]:
    """The machines to draw: all when they fit, else the busiest and the idlest halves."""
    names = [m.machine for m in s.machines]
    if len(names) <= limit:
        return sorted(names)
    keep = {m.machine for m in s.busiest(limit - limit // 2)} | {m.machine for m in s.idlest(limit // 2)}
    return sorted(keep)


def _figure(machine: str, f: Frames, tasks: Sequence[TaskMark], pl: Any) -> Figure:
    from matplotlib.figure import Figure

    has_gpus = f.gpus.filter(pl.col("machine") == machine).height > 0
    fig = Figure(figsize=(11, 7.5 if has_gpus else 4.2), layout="constrained")
    draw_machine(fig, machine, f, tasks, pl)
    return fig


def write_html(path: Path, s: Summary, f: Frames, tasks: Sequence[TaskMark], max_machines: int) -> None:
    _need_matplotlib()
    import polars as pl

    machines = chosen_machines(s, max_machines)
    rows = "\n".join(
        f'<tr><th>{html.escape(label)}</th><td id="{key}">{html.escape(value)}</td></tr>'
        for key, label, value in summary_rows(s)
    )
    per_machine = "\n".join(
        f"<tr><td>{html.escape(m.machine)}</td><td>{m.hours:.3f}</td><td>{m.gpus}</td><td>{m.gpu_hours:.3f}</td>"
        f"<td>{_pct(m.mean_cpu_percent)}</td><td>{_pct(m.mean_gpu_util_percent)}</td>"
        f"<td>{m.idle_gpu_hours:.3f}</td><td>{_money(m.price_per_hour)}</td></tr>"
        for m in s.machines
    )
    plots = []
    for machine in machines:
        mine = [t for t in tasks if t.machine == machine]
        buffer = io.StringIO()
        _figure(machine, f, mine, pl).savefig(buffer, format="svg")
        svg = buffer.getvalue()
        plots.append(
            f'<section class="machine" id="machine-{html.escape(machine)}">{svg[svg.index("<svg") :]}</section>'
        )
    left_out = len(s.machines) - len(machines)
    note = (
        f"<p>{left_out} machines not drawn (the busiest and idlest {len(machines)} are); "
        "<code>--format parquet</code> has every sample.</p>"
        if left_out
        else ""
    )
    task_rows = "\n".join(
        f"<tr><td>{html.escape(t.machine)}</td><td><code>{html.escape(' '.join(t.argv))}</code></td>"
        f"<td>{_utc(t.started_at) if t.started_at else '-'}</td>"
        f"<td>{_utc(t.ended_at) if t.ended_at else 'running'}</td>"
        f"<td>{'' if t.exit_code is None else t.exit_code}</td></tr>"
        for t in tasks
    )
    page = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>rawvm report: {html.escape(s.cluster)}</title>
<style>
body {{ font-family: sans-serif; margin: 1.5em; color: #222; }}
table {{ border-collapse: collapse; margin-bottom: 1em; }}
th, td {{ text-align: left; padding: 0.2em 0.8em; border-bottom: 1px solid #ddd; font-size: 0.9em; }}
section.machine svg {{ max-width: 100%; height: auto; }}
</style></head><body>
<h1>rawvm report: {html.escape(s.cluster)}</h1>
<table id="summary">
{rows}
</table>
<h2>Machines</h2>
<table id="per-machine"><tr><th>machine</th><th>hours</th><th>GPUs</th><th>GPU-hours</th><th>mean CPU</th>
<th>mean GPU util</th><th>idle GPU-hours</th><th>$/hour</th></tr>
{per_machine}
</table>
<h2>Tasks</h2>
<table id="tasks"><tr><th>machine</th><th>command</th><th>started</th><th>ended</th><th>exit</th></tr>
{task_rows}
</table>
<h2>Over time</h2>
<p>Dashed lines: task start (green) and end (red).</p>
{note}
{"".join(plots)}
</body></html>
"""
    path.write_text(page, encoding="utf-8")


def write_png(path: Path, s: Summary, f: Frames, tasks: Sequence[TaskMark], max_machines: int) -> None:
    """One image: the summary as text, then each chosen machine's panels."""
    _need_matplotlib()
    import polars as pl
    from matplotlib.figure import Figure

    machines = chosen_machines(s, max_machines)
    heights = [2.6] + [7.5 if f.gpus.filter(pl.col("machine") == m).height else 4.2 for m in machines]
    fig = Figure(figsize=(11, sum(heights)), layout="constrained")
    made: Any = fig.subfigures(len(heights), 1, height_ratios=heights, squeeze=False)
    subfigs = [row[0] for row in made]
    text = "\n".join(f"{label}: {value}" for _, label, value in summary_rows(s))
    subfigs[0].text(0.01, 0.98, f"rawvm report: {s.cluster}\n\n{text}", va="top", family="monospace", fontsize=9)
    for sub, machine in zip(subfigs[1:], machines, strict=True):
        draw_machine(sub, machine, f, [t for t in tasks if t.machine == machine], pl)
    fig.savefig(path, format="png", dpi=90)
