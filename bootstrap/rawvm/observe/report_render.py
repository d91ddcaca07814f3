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
from rawvm.observe.report_data import EXTRA_HINT, Frames, TaskMark
from rawvm.observe.report_summary import Summary

if TYPE_CHECKING:
    from matplotlib.figure import Figure, SubFigure

MAX_POINTS = 1500
GIB = float(1 << 30)
FIGURE_WIDTH_IN = 11.0
AXES_WIDTH_IN = FIGURE_WIDTH_IN - 1.2  # less the y labels and ticks: what the task labels are placed over


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
        (
            "machines",
            "machines",
            str(s.machine_count) + (f" ({', '.join(s.silent)}: no telemetry)" if s.silent else ""),
        ),
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


START_COLOR, END_COLOR = "tab:green", "tab:red"
LABEL_POINTS = 7  # the task labels' font size
LABEL_ROWS = 3  # labels stack in up to this many rows before they are left out
LABEL_CHARS = 28


def _when(t: float) -> Any:
    import datetime as dt

    return dt.datetime.fromtimestamp(t, dt.UTC).replace(tzinfo=None)


def _marks(ax: Any, tasks: Sequence[TaskMark]) -> None:
    for task in tasks:
        for when, color in ((task.started_at, START_COLOR), (task.ended_at, END_COLOR)):
            if when:
                ax.axvline(_when(when), color=color, lw=0.8, ls="--")


def label_slots(
    tasks: Sequence[TaskMark], period: tuple[float, float], width_in: float, rows: int = LABEL_ROWS
) -> list[tuple[TaskMark, int]]:
    """Which task labels to print, and in which row, so that no two overlap: a label goes in the first row where
    the previous label has ended (its width estimated from its characters), and is left out when no row has room.
    ``width_in``: the axes' width in inches over ``period``."""
    span = max(period[1] - period[0], 1e-9)
    row_end = [-float("inf")] * rows  # where each row's last label ends, in inches from the left
    placed = []
    for task in sorted((t for t in tasks if t.started_at), key=lambda t: float(t.started_at or 0)):
        x = (float(task.started_at or 0) - period[0]) / span * width_in
        width = (len(task.label[:LABEL_CHARS]) + 1) * LABEL_POINTS * 0.62 / 72
        for row in range(rows):
            if x >= row_end[row]:
                row_end[row] = x + width
                placed.append((task, row))
                break
    return placed


def _labels(ax: Any, tasks: Sequence[TaskMark], period: tuple[float, float], width_in: float) -> int:
    """The labels ``label_slots`` has room for, top down from the axes' top; returns how many were left out."""
    placed = label_slots(tasks, period, width_in)
    for task, row in placed:
        ax.annotate(
            task.label[:LABEL_CHARS],
            (_when(float(task.started_at or 0)), 1),
            xytext=(2, -2 - row * (LABEL_POINTS + 2)),
            textcoords="offset points",
            xycoords=("data", "axes fraction"),
            fontsize=LABEL_POINTS,
            va="top",
            clip_on=True,
            bbox={"boxstyle": "square,pad=0.05", "facecolor": "white", "edgecolor": "none", "alpha": 0.75},
        )
    return sum(1 for t in tasks if t.started_at) - len(placed)


def mark_legend(fig: Figure | SubFigure) -> None:
    """What the dashed lines are."""
    from matplotlib.lines import Line2D

    handles = [
        Line2D([], [], color=START_COLOR, lw=0.8, ls="--", label="task start (label: batch id and value, or command)"),
        Line2D([], [], color=END_COLOR, lw=0.8, ls="--", label="task end"),
    ]
    fig.legend(handles=handles, loc="upper right", fontsize=7, frameon=False)


def draw_machine(
    fig: Figure | SubFigure,
    machine: str,
    f: Frames,
    tasks: Sequence[TaskMark],
    pl: Any,
    period: tuple[float, float],
    share: Any = None,
) -> list[Any]:
    """One machine over time: CPU, memory, network, and (when it has GPUs) each GPU's utilization/memory/power,
    over the whole cluster's ``period`` (every machine on the same time axis: ``share``, an axes to share x with);
    returns its axes."""
    rows = _thin(f.machines.filter(pl.col("machine") == machine))
    gpus = f.gpus.filter(pl.col("machine") == machine)
    panels = 6 if gpus.height else 3
    axes = list(fig.subplots(panels, 1, sharex=True))
    if share is not None:
        axes[0].sharex(share)
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
    for ax in axes:
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
        _marks(ax, tasks)
    axes[0].set_xlim(_when(period[0]), _when(period[1]))
    left_out = _labels(axes[0], tasks, period, AXES_WIDTH_IN)
    if left_out:
        axes[0].set_title(f"{left_out} task labels left out (no room)", fontsize=6, loc="right")
    axes[-1].set_xlabel("time (UTC)", fontsize=8)
    return axes


def chosen_machines(s: Summary, limit: int) -> list[str]:
    """The machines to draw: all when they fit, else the busiest and the idlest halves."""
    names = [m.machine for m in s.machines]
    if len(names) <= limit:
        return sorted(names)
    keep = {m.machine for m in s.busiest(limit - limit // 2)} | {m.machine for m in s.idlest(limit // 2)}
    return sorted(keep)


def _figure(machine: str, f: Frames, tasks: Sequence[TaskMark], pl: Any, period: tuple[float, float]) -> Figure:
    from matplotlib.figure import Figure

    has_gpus = f.gpus.filter(pl.col("machine") == machine).height > 0
    fig = Figure(figsize=(FIGURE_WIDTH_IN, 7.5 if has_gpus else 4.2), layout="constrained")
    draw_machine(fig, machine, f, tasks, pl, period)
    mark_legend(fig)
    return fig


def period_of(s: Summary, tasks: Sequence[TaskMark]) -> tuple[float, float]:
    """The time axis every machine shares: the first sample or task start to the last sample or task end."""
    times = [s.start, s.end, *(t.started_at for t in tasks if t.started_at), *(t.ended_at for t in tasks if t.ended_at)]
    return min(times), max(times)


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
        _figure(machine, f, mine, pl, period_of(s, tasks)).savefig(buffer, format="svg")
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
        f"<tr><td>{html.escape(t.machine)}</td><td>{'' if t.batch_id is None else t.batch_id}</td>"
        f"<td>{'' if t.value is None else html.escape(t.value)}</td>"
        f"<td><code>{html.escape(' '.join(t.argv))}</code></td>"
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
<table id="tasks"><tr><th>machine</th><th>batch id</th><th>value</th><th>command</th><th>started</th><th>ended</th>
<th>exit</th></tr>
{task_rows}
</table>
<h2>Over time</h2>
<p>Dashed lines: task start (green, labelled with the batch id and value, or the command) and end (red).</p>
{note}
{"".join(plots)}
</body></html>
"""
    path.write_text(page, encoding="utf-8")


def png_figure(s: Summary, f: Frames, tasks: Sequence[TaskMark], max_machines: int) -> Figure:
    """The PNG's figure: the summary as text and the task marks' legend, then each chosen machine's panels, all on
    one shared time axis."""
    _need_matplotlib()
    import polars as pl
    from matplotlib.figure import Figure

    machines = chosen_machines(s, max_machines)
    heights = [2.6] + [7.5 if f.gpus.filter(pl.col("machine") == m).height else 4.2 for m in machines]
    fig = Figure(figsize=(FIGURE_WIDTH_IN, sum(heights)), layout="constrained")
    made: Any = fig.subfigures(len(heights), 1, height_ratios=heights, squeeze=False)
    subfigs = [row[0] for row in made]
    text = "\n".join(f"{label}: {value}" for _, label, value in summary_rows(s))
    subfigs[0].text(0.01, 0.98, f"rawvm report: {s.cluster}\n\n{text}", va="top", family="monospace", fontsize=9)
    mark_legend(subfigs[0])
    period = period_of(s, tasks)
    share = None
    for sub, machine in zip(subfigs[1:], machines, strict=True):
        axes = draw_machine(sub, machine, f, [t for t in tasks if t.machine == machine], pl, period, share)
        share = share or axes[0]
    return fig


def write_png(path: Path, s: Summary, f: Frames, tasks: Sequence[TaskMark], max_machines: int) -> None:
    """One image: ``png_figure``."""
    png_figure(s, f, tasks, max_machines).savefig(path, format="png", dpi=90)
