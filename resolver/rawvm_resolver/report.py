"""The translation report: one row per package decision, as a table (--explain) or JSON (--json)."""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import asdict, dataclass

# In the order --explain lists them.
ACTIONS = ("translated", "dropped", "version-changed", "builds-from-source", "added", "kept")
_TITLES = {
    "kept": "kept",
    "version-changed": "version changed",
    "translated": "translated",
    "dropped": "dropped",
    "added": "added for the target",
    "builds-from-source": "builds from source",
}


@dataclass(frozen=True, order=True)
class ReportRow:
    name: str
    action: str  # one of ACTIONS
    source: str  # version or spec in the source; "" when added
    target: str  # version in the lock; "" when dropped
    reason: str


def sorted_rows(rows: Iterable[ReportRow]) -> list[ReportRow]:
    return sorted(rows, key=lambda row: (row.name, row.action))


def format_table(rows: Iterable[ReportRow], *, title: str = "") -> str:
    """A plain-text table grouped by action; kept packages are summarised unless they carry a note."""
    rows = sorted_rows(rows)
    lines = [title] if title else []
    counts = {action: sum(1 for row in rows if row.action == action) for action in ACTIONS}
    lines.append(", ".join(f"{counts[action]} {_TITLES[action]}" for action in ACTIONS if counts[action]))
    width = max((len(row.name) for row in rows), default=4)
    for action in ACTIONS:
        group = [row for row in rows if row.action == action]
        if not group:
            continue
        lines.append("")
        lines.append(f"{_TITLES[action]} ({len(group)}):")
        for row in group:
            change = _change(row)
            lines.append(f"  {row.name:<{width}}  {change:<24}  {row.reason}".rstrip())
    return "\n".join(lines)


def _change(row: ReportRow) -> str:
    if row.source and row.target and row.source != row.target:
        return f"{row.source} -> {row.target}"
    if row.source and not row.target:
        return f"{row.source} -> (none)"
    if row.target and not row.source:
        return f"(new) {row.target}"
    return row.target or row.source


def to_json(rows: Iterable[ReportRow], **extra: object) -> str:
    return json.dumps({**extra, "report": [asdict(row) for row in sorted_rows(rows)]}, indent=2, sort_keys=True)
