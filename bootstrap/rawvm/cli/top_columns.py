"""Which of ``rawvm top``'s columns fit the terminal: each has a priority, and the least needed go first, so an
80-column terminal still shows every machine's name, phase and CPU in full rather than a row of "…".

The columns keep their order on screen; the task's command line is the one column that shrinks (cut with "…")
before lower columns are dropped, since it is the only one whose width is unbounded.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from rich.cells import cell_len

__all__ = ["COLUMNS", "GAP", "MIN_TASK", "Column", "fit"]

GAP = 2  # a rich Table without a box pads each column by one cell on either side of its neighbour
MIN_TASK = 8  # narrower than this, a command line says nothing: the column goes instead


@dataclass(frozen=True)
class Column:
    name: str
    justify: str
    priority: int  # 0 is kept longest; the highest goes first when the screen is narrow
    gpu: bool = False  # only shown when some machine has GPUs
    optional: bool = False  # only shown when the rows carry it (tensor: where some GPU reports NVML GPM)


COLUMNS = (
    Column("machine", "left", 0),
    Column("phase", "left", 1),
    Column("task", "left", 3),
    Column("cpu", "right", 2),
    Column("memory", "right", 4),
    Column("disk", "right", 10),
    Column("net ↓ / ↑", "right", 11),
    Column("gpu", "right", 8, gpu=True),
    Column("util", "right", 7, gpu=True),
    Column("gpu mem", "right", 9, gpu=True),
    Column("power", "right", 13, gpu=True),
    Column("temp", "right", 12, gpu=True),
    Column("throttle", "left", 14, gpu=True),
    Column("idle", "right", 5),
    Column("cost", "right", 6),
    Column("tensor", "right", 15, gpu=True, optional=True),
)


def _width(column: Column, cells: Sequence[str]) -> int:
    lines = [line for cell in cells for line in cell.split("\n")]
    return max([cell_len(column.name), *(cell_len(line) for line in lines)])


def fit(cells: dict[str, list[str]], width: int, gpus: bool) -> tuple[list[Column], int]:
    """The columns to show within ``width`` cells, in screen order, and the task column's width. ``cells`` maps
    each column's name to its cells' text.

    The task column is chosen at ``MIN_TASK`` cells (or its full width when less), then gets what is left over:
    lower columns (memory, idle, cost) stay on screen rather than giving way to a long command line.
    """
    candidates = [c for c in COLUMNS if (gpus or not c.gpu) and (c.name in cells or not c.optional)]
    widths = {c.name: _width(c, cells.get(c.name, [])) for c in candidates}
    full_task = widths.get("task", 0)
    widths["task"] = min(full_task, MIN_TASK)
    chosen: list[Column] = []
    used = 0
    full = False  # a column did not fit: every column of lower priority goes too, so the set is predictable
    for column in sorted(candidates, key=lambda c: c.priority):
        need = widths[column.name] + (GAP if chosen else 0)
        full = full or used + need > width
        if not full or column.priority <= 2:  # name, phase and CPU stay even when nothing else fits
            chosen.append(column)
            used += need
    task_width = min(full_task, widths["task"] + max(0, width - used))
    order = {c.name: i for i, c in enumerate(COLUMNS)}
    return sorted(chosen, key=lambda c: order[c.name]), task_width
