"""``rawvm cancel CLUSTER [TASK]``: what Ctrl-C does to a run, from another terminal (see rawvm.runs)."""

from __future__ import annotations

import argparse
from typing import Any


def _cancel(args: argparse.Namespace) -> int:
    from rawvm import clusters, runs
    from rawvm.session import say, stops_line

    cancelled = runs.cancel(args.cluster, args.task)
    count = sum(len(ids) for ids in cancelled.values())
    where = ", ".join(mid for mid, ids in cancelled.items() if ids) or "none of its machines"
    record = clusters.load(args.cluster)
    say(f"cancelled {count} task{'s' if count != 1 else ''} on {where}; {stops_line(record)}")
    return 0


def register(subparsers: Any) -> None:
    cancel = subparsers.add_parser(
        "cancel",
        help="cancel the running tasks of a cluster (or one task); the machines then idle off",
        description="SIGTERM to each running task's processes, SIGKILL after 5 s; their output so far is kept "
        "(rawvm logs). The machines stay up until their keepalive: 'rawvm down CLUSTER' stops them now.",
    )
    cancel.add_argument("cluster", metavar="CLUSTER")
    cancel.add_argument("task", nargs="?", default=None, metavar="TASK", help="one task's id (default: all running)")
    cancel.set_defaults(func=_cancel)
