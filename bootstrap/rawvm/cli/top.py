"""``rawvm top [CLUSTER]``: a live full-screen table of every machine, refreshed every second.

Rows that do not fit the terminal are left out (the header counts them; ``--json`` has them all). A machine with
GPUs takes one line per GPU. Ctrl-C quits.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import os
import time
from collections.abc import Sequence
from typing import Any

from rawvm.errors import RawvmError

GIB = 1 << 30


def _records(cluster: str | None, *, none_ok: bool = False) -> list[Any]:
    """The clusters to follow; none at all is an error to the live table, ``[]`` to ``--json``."""
    from rawvm import clusters

    if cluster:
        return [clusters.load(cluster)]
    records = clusters.all_records()
    if not records and not none_ok:
        raise RawvmError("no clusters to watch: start one with 'rawvm up', see 'rawvm ls'")
    return records


def duration(seconds: float) -> str:
    seconds = max(0, int(seconds))
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    if seconds >= 60:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds}s"


def _rate(value: float | None) -> str:
    if value is None:
        return "-"
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if value >= size:
            return f"{value / size:.1f} {unit}/s"
    return f"{value:.0f} B/s"


def _gib(used: int | None, total: int | None) -> str:
    if used is None or not total:
        return "-"
    return f"{used / GIB:.1f}/{total / GIB:.1f} GiB"


def _money(value: float | None, price: float | None) -> str:
    if value is None:
        return "unknown"  # no price on record: never a guess
    return "free" if price == 0 else f"${value:.2f}"


def _fmt(value: float | None, spec: str, suffix: str = "") -> str:
    return "-" if value is None else f"{value:{spec}}{suffix}"


def summary_line(views: Sequence[Any], now: float, hidden: int = 0) -> str:
    answering = [v for v in views if v.answering]
    busy = sum(1 for v in answering if v.phase == "busy")
    idle = sum(1 for v in answering if v.phase == "idle")
    gpus = [g.util_percent for v in answering for g in v.gpus if g.util_percent is not None]
    costs = [v.cost_so_far(now) for v in views]
    known = sum(c for c in costs if c is not None)
    unknown = sum(1 for c in costs if c is None)
    cost = f"${known:.2f}" + (f" + {unknown} machine(s) at an unknown price" if unknown else "")
    if unknown == len(costs) and costs:
        cost = "unknown"
    parts = [
        f"{len(views)} machines: {busy} busy, {idle} idle, {len(views) - len(answering)} not answering",
        f"GPUs {len(gpus)}, mean util {sum(gpus) / len(gpus):.0f}%" if gpus else "no GPUs",
        f"cost so far {cost}",
        time.strftime("%H:%M:%S", time.localtime(now)),
    ]
    if hidden:
        parts.append(f"{hidden} more rows below the screen (rawvm top --json has every machine)")
    return " · ".join(parts)


def _row(v: Any, now: float, many_clusters: bool) -> dict[str, str]:
    """One machine's cells by column name (a machine with GPUs: one line per GPU in the GPU columns)."""
    since = f" {duration(now - v.last_answer)}" if v.last_answer else ""
    phase = v.phase if v.answering else f"no answer{since}"
    if v.phase == "idle" and v.answering:
        idle = duration(v.idle_seconds) + (f" of {duration(v.keepalive_s)}" if v.keepalive_s else "")
    else:
        idle = "-"
    disk = (
        f"{100 * v.disk_used_bytes / v.disk_total_bytes:.0f}%"
        if v.disk_used_bytes is not None and v.disk_total_bytes
        else "-"
    )
    g = v.gpus
    return {
        "machine": f"{v.cluster}/{v.machine}" if many_clusters else v.machine,
        "phase": phase,
        "task": (v.task[:40] + "…") if len(v.task) > 41 else v.task,
        "cpu": _fmt(v.cpu_percent, ".0f", "%"),
        "memory": _gib(v.memory_used_bytes, v.memory_total_bytes),
        "disk": disk,
        "net ↓ / ↑": f"{_rate(v.net_receive_bytes_per_s)} / {_rate(v.net_transmit_bytes_per_s)}",
        "gpu": "\n".join(str(x.index) for x in g) or "-",
        "util": "\n".join(_fmt(x.util_percent, ".0f", "%") for x in g),
        "gpu mem": "\n".join(_gib(x.memory_used_bytes, x.memory_total_bytes) for x in g),
        "power": "\n".join(_fmt(x.power_watts, ".0f", " W") for x in g),
        "temp": "\n".join(_fmt(x.temperature_celsius, ".0f", " °C") for x in g),
        "throttle": "\n".join(",".join(x.throttle) or "-" for x in g),
        "idle": idle,
        "cost": _money(v.cost_so_far(now), v.price_per_hour),
        "tensor": _fmt(getattr(v, "tensor_active_percent", None), ".0f", "%"),
    }


def render(views: Sequence[Any], now: float, height: int, width: int = 250) -> Any:
    """The screen: a summary line, then as many machine rows as fit in ``height`` lines, with the columns that
    fit in ``width`` (the least needed dropped first: name, phase and CPU always stay)."""
    from rich.console import Group
    from rich.table import Table
    from rich.text import Text

    from rawvm.cli.top_columns import fit

    many_clusters = len({v.cluster for v in views}) > 1
    budget = max(1, height - 3 - len(summary_line(views, now)) // max(1, width))  # a wrapped summary, a header
    hidden = 0
    shown: list[tuple[Any, dict[str, str]]] = []
    for v in views:
        lines = max(1, len(v.gpus))
        if budget < lines:
            hidden += 1
            continue
        budget -= lines
        shown.append((v, _row(v, now, many_clusters)))
    cells = {name: [row[name] for _, row in shown] for name in (shown[0][1] if shown else {})}
    # Tensor-core activity (NVML GPM, Hopper and later): a column only when some machine reports it.
    if not any(getattr(v, "tensor_active_percent", None) is not None for v, _ in shown):
        cells.pop("tensor", None)
    columns, task_width = fit(cells, width, any(v.gpus for v, _ in shown))
    table = Table(box=None, pad_edge=False, header_style="bold", expand=False)
    for column in columns:
        table.add_column(
            column.name,
            justify=column.justify,  # type: ignore[arg-type]
            no_wrap=True,
            max_width=task_width if column.name == "task" else None,
            overflow="ellipsis",
        )
    colours = {"busy": "green", "idle": "yellow", "failed": "red"}
    for v, row in shown:
        phase = Text(row["phase"], style=colours.get(v.phase, "") if v.answering else "bold red")
        values = [phase if c.name == "phase" else row[c.name] for c in columns]
        table.add_row(*values, style="" if v.answering else "dim")
    header = Text(f"rawvm top · {summary_line(views, now, hidden)} · Ctrl-C quits", style="bold")
    return Group(header, table)


def snapshot_json(views: Sequence[Any], now: float) -> str:
    """One row per machine, a list like ``ls --json`` (no clusters: ``[]``); ``time`` is when the snapshot was
    taken, which ``cost_so_far_usd`` counts up to."""
    rows = [{**dataclasses.asdict(v), "cost_so_far_usd": v.cost_so_far(now), "time": now} for v in views]
    return json.dumps(rows, indent=2, sort_keys=True)


async def _poll_once(records: list[Any], connections: int) -> list[Any]:
    from rawvm.observe.top import Follower

    async with Follower(records, connections=connections) as follower:
        return await follower.poll_all()


async def _live(records: list[Any], interval: float, connections: int, console: Any) -> None:
    from rich.live import Live

    from rawvm.observe.top import Follower

    async with Follower(records, interval=interval, connections=connections) as follower:
        follow = asyncio.create_task(follower.run())
        try:
            with Live(console=console, screen=True, auto_refresh=False, transient=True) as live:
                while not follow.done():
                    now = time.time()
                    size = console.size
                    live.update(render(follower.views, now, size.height, size.width), refresh=True)
                    await asyncio.sleep(interval - now % interval)  # on the second, like top
        finally:
            follow.cancel()
            await asyncio.gather(follow, return_exceptions=True)


def _top(args: argparse.Namespace) -> int:
    if args.interval <= 0:
        from rawvm.errors import UsageError

        raise UsageError("--interval must be more than 0 seconds")
    if args.connections < 1:
        from rawvm.errors import UsageError

        raise UsageError("--connections must be at least 1")
    records = _records(args.cluster, none_ok=args.json)
    if args.json:  # no clusters: an empty list, so a script reads one shape
        views = asyncio.run(_poll_once(records, args.connections)) if records else []
        print(snapshot_json(views, time.time()))
        return 0
    from rich.console import Console

    console = Console()
    if not console.is_terminal:  # piped or redirected: one table, every row, no screen control codes
        width = int(os.environ.get("COLUMNS") or 250)  # not squeezed into 80 columns
        console = Console(width=width)
        console.print(render(asyncio.run(_poll_once(records, args.connections)), time.time(), 1 << 30, width))
        return 0
    with contextlib.suppress(KeyboardInterrupt):  # Ctrl-C is how one leaves top
        asyncio.run(_live(records, args.interval, args.connections, console))
    return 0


def register(subparsers: Any) -> None:
    top = subparsers.add_parser(
        "top",
        help="a live table of every machine: phase, task, CPU, memory, disk, network, GPUs, idle clock, cost",
        description="Follow the agents of CLUSTER (default: every cluster) and show what each machine does, "
        "refreshed every second. Watching never keeps a machine alive.",
    )
    top.add_argument("cluster", nargs="?", default=None, metavar="CLUSTER")
    top.add_argument("--json", action="store_true", help="print one snapshot as JSON and exit (also: pipe it)")
    top.add_argument("--interval", type=float, default=1.0, metavar="S", help="seconds between looks (%(default)s)")
    top.add_argument(
        "--connections", type=int, default=64, metavar="N", help="at most N requests in flight (%(default)s)"
    )
    top.set_defaults(func=_top)
