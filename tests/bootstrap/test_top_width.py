"""``rawvm top`` at 80 columns: columns give way by priority, and each machine's phase and CPU show in full."""

from __future__ import annotations

import time

import pytest
from rawvm.cli.top import render
from rawvm.cli.top_columns import COLUMNS, fit
from rawvm.observe.top import GpuView, MachineView
from rich.console import Console

GIB = 1 << 30


def machines(now: float) -> list[MachineView]:
    common = {"provider": "aws", "agent_url": "https://x", "launched_at": now - 3600, "last_answer": now - 65}
    views = []
    for i, (phase, cpu) in enumerate([("busy", 97.0), ("idle", 3.0), ("busy", 55.0)]):
        view = MachineView(cluster="rawvm-a1b2c3", machine=f"m{i}", price_per_hour=0.768, **common)
        view.answering, view.phase, view.cpu_percent = True, phase, cpu
        view.task = "python train.py --epochs 100 --learning-rate 0.0003 --batch-size 512"
        view.memory_used_bytes, view.memory_total_bytes = 12 * GIB, 31 * GIB
        view.disk_used_bytes, view.disk_total_bytes = 40 * GIB, 100 * GIB
        view.net_receive_bytes_per_s, view.net_transmit_bytes_per_s = 2.5e6, 1.2e5
        view.idle_seconds, view.keepalive_s = 65.0, 1200.0
        views.append(view)
    views[2].gpus = [
        GpuView(index=i, util_percent=80.0 + i, power_watts=250.0, temperature_celsius=70.0) for i in range(2)
    ]
    lost = MachineView(cluster="rawvm-a1b2c3", machine="m3", price_per_hour=None, **common)
    views.append(lost)
    return views


def screen(views: list[MachineView], now: float, width: int) -> str:
    console = Console(width=width, height=24, record=True, color_system=None)
    console.print(render(views, now, 24, width))
    return console.export_text()


@pytest.mark.parametrize("width", [80, 60])
def test_at_80_columns_each_machines_phase_and_cpu_show_in_full(width: int) -> None:
    now = time.time()
    views = machines(now)
    text = screen(views, now, width)
    lines = text.splitlines()
    table = lines[next(i for i, line in enumerate(lines) if line.startswith("machine")) :]
    assert all(len(line) <= width for line in table), text
    header = table[0].split()
    assert header[:3] == ["machine", "phase", "task"] or header[:2] == ["machine", "phase"]
    assert "cpu" in header
    rows = {line.split()[0]: line for line in table[1:] if line.split() and line.split()[0].startswith("m")}
    assert set(rows) == {"m0", "m1", "m2", "m3"}, text
    for view in views[:3]:
        assert f" {view.phase} " in rows[view.machine], text
        assert f"{view.cpu_percent:.0f}%" in rows[view.machine], text
    assert "no answer 1m05s" in rows["m3"], text
    phase_and_cpu = [c for c in table[0].split() if c in ("phase", "cpu")]
    assert phase_and_cpu == ["phase", "cpu"]


def test_a_wide_terminal_keeps_every_column() -> None:
    now = time.time()
    text = screen(machines(now), now, 250)
    for column in (c for c in COLUMNS if not c.optional):  # tensor shows only where a GPU reports NVML GPM
        assert column.name in text
    assert "python train.py --epochs 100 --learning-…" in text  # the task's own 40-character cut, as before


def test_columns_go_by_priority_and_the_task_takes_what_is_left() -> None:
    cells = {
        "machine": ["m0"],
        "phase": ["busy"],
        "task": ["x" * 60],
        "cpu": ["97%"],
        "memory": ["12.0/31.0 GiB"],
        "idle": ["-"],
        "cost": ["$0.77"],
        "disk": ["40%"],
        "net ↓ / ↑": ["2.5 MB/s / 120.0 kB/s"],
    }
    columns, task_width = fit(cells, 80, gpus=False)
    names = [c.name for c in columns]
    assert names[:4] == ["machine", "phase", "task", "cpu"]
    assert "memory" in names and "cost" in names and "idle" in names
    assert "gpu" not in names  # no machine has a GPU: no GPU columns at all
    widths = {"task": task_width} | {n: max(len(n), len(cells[n][0])) for n in names if n != "task"}
    assert sum(widths.values()) + 2 * (len(names) - 1) <= 80
    tiny, _ = fit(cells, 20, gpus=False)
    assert [c.name for c in tiny] == ["machine", "phase", "cpu"]  # never fewer than these
