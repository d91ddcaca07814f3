"""``rawvm dask up`` / ``rawvm dask down``: a Dask cluster on rawvm machines from the command line."""

from __future__ import annotations

import argparse
from typing import Any

from rawvm.errors import UsageError
from rawvm.providers import PROVIDERS


def _up(args: argparse.Namespace) -> int:
    try:
        from rawvm.dask.cluster import dask_cluster
    except ImportError:
        raise UsageError("Dask clusters need the 'dask' extra: pip install 'rawvm[dask]'") from None

    cluster = dask_cluster(
        args.n,
        provider=args.provider,
        vm_type=args.vm_type,
        cpu=args.cpu,
        memory=args.memory,
        gpu=args.gpu,
        arm=args.arm,
        region=args.region,
        spot_policy=args.spot_policy,
        keepalive=args.keepalive,
        max_lifetime=args.max_lifetime,
        scheduler_vm_type=args.scheduler_vm_type,
        dedicated_scheduler=not args.shared_scheduler,
        source=args.source,
        extra_ca_certs=args.extra_ca_certs,
        name=args.cluster,
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
    dask = subparsers.add_parser("dask", help="a Dask cluster on rawvm machines (TLS, stops when idle)")
    verbs = dask.add_subparsers(dest="dask_command", required=True)
    up = verbs.add_parser("up", help="start a Dask cluster and print its name")
    up.add_argument("--provider", default="local", help=f"where machines run: {' | '.join(PROVIDERS)} (%(default)s)")
    up.add_argument("-n", type=int, default=1, metavar="N", help="how many worker machines (%(default)s)")
    up.add_argument("--vm-type", default="", metavar="T", help="workers' instance type, e.g. m7i.large")
    up.add_argument("--scheduler-vm-type", default="", metavar="T", help="the scheduler's (default: the workers')")
    up.add_argument("--shared-scheduler", action="store_true", help="run the scheduler on the first worker's machine")
    up.add_argument("--cpu", type=int, default=0, metavar="C", help="at least C vCPUs (instead of --vm-type)")
    up.add_argument("--memory", type=float, default=0, metavar="M", help="at least M GiB of memory")
    up.add_argument("--gpu", action="store_true", help="NVIDIA GPU machines: one worker per GPU")
    up.add_argument("--arm", action="store_true", help="aarch64 machines")
    up.add_argument("--region", default="", metavar="R", help="cloud region (aws)")
    up.add_argument("--keepalive", default="20m", metavar="D", help="stop after this long with no task and no client")
    up.add_argument("--max-lifetime", default="12h", metavar="D", help="stop after this long, even busy")
    up.add_argument("--spot-policy", default="on-demand", metavar="P", help="on-demand | spot | spot_with_fallback")
    up.add_argument(
        "--from", dest="source", default=None, metavar="PATH", help="environment to lock (with distributed)"
    )
    up.add_argument("--extra-ca-cert", dest="extra_ca_certs", action="append", default=[], metavar="PEM")
    up.add_argument("--cluster", default=None, metavar="NAME", help="cluster name (default: a fresh one)")
    up.set_defaults(func=_up)
    down = verbs.add_parser("down", help="stop every machine of a Dask cluster now")
    down.add_argument("name")
    down.set_defaults(func=_down)
