"""``rawvm dask up`` / ``rawvm dask down``: a Dask cluster on rawvm machines from the command line."""

from __future__ import annotations

import argparse
from typing import Any

from rawvm.cli.flags import launch_options, machine_flags
from rawvm.errors import UsageError


def _up(args: argparse.Namespace) -> int:
    try:
        from rawvm.dask.cluster import make_cluster
    except ImportError:
        raise UsageError("Dask clusters need the 'dask' extra: pip install 'rawvm[dask]'") from None

    options = launch_options(args, n=max(1, args.n))
    cluster = make_cluster(
        args.n,
        options.replace(cluster=None),
        name=options.cluster,
        scheduler_vm_type=args.scheduler_vm_type,
        dedicated_scheduler=not args.shared_scheduler,
        shutdown_on_close=False,  # the cluster outlives this command: its keepalive or 'rawvm dask down' ends it
    )
    cluster.save()
    name = cluster.options.name
    print(name)
    import sys

    print(
        f"rawvm: Dask scheduler {cluster.scheduler_address}, dashboard {cluster.dashboard_link}\n"
        f"rawvm: connect with: from rawvm.dask.cluster import connect; client = connect({name!r})\n"
        f"rawvm: it stops after {args.keepalive} with no task and no client, or now: rawvm dask down {name}",
        file=sys.stderr,
    )
    return 0


def _down(args: argparse.Namespace) -> int:
    import sys

    from rawvm.dask.cluster import down

    stopped = down(args.name)
    print(f"rawvm: stopped {stopped} machine{'s' if stopped != 1 else ''} of Dask cluster {args.name}", file=sys.stderr)
    return 0


def register(subparsers: Any) -> None:
    dask = subparsers.add_parser(
        "dask",
        help="a Dask cluster on rawvm machines (TLS, stops when idle)",
        description="Start or stop a Dask cluster on rawvm machines: a scheduler and workers in this "
        "environment, every connection TLS; it stops by itself when it has no task and no client.",
    )
    verbs = dask.add_subparsers(dest="dask_command", required=True)
    up = verbs.add_parser(
        "up",
        help="start a Dask cluster and print its name",
        description="Start a Dask scheduler and N worker machines, print the cluster's name, and return; connect "
        "with rawvm.dask.cluster.connect(NAME). It outlives this command until its keepalive or 'rawvm dask down'.",
    )
    machine_flags(up, machines="how many worker machines", keepalive="stop after this long with no task and no client")
    up.add_argument("--scheduler-vm-type", default="", metavar="T", help="the scheduler's (default: the workers')")
    up.add_argument("--shared-scheduler", action="store_true", help="run the scheduler on the first worker's machine")
    up.set_defaults(func=_up)
    down = verbs.add_parser(
        "down",
        help="stop every machine of a Dask cluster now",
        description="Stop the scheduler's and every worker's machine of the Dask cluster NAME now.",
    )
    down.add_argument("name")
    down.set_defaults(func=_down)
