"""``rawvm run``, ``up``, ``ls``, ``logs``, ``down``: the front door on the command line (see rawvm.api)."""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any

from rawvm.providers import PROVIDERS


def _machine_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--provider", default="local", help=f"where machines run: {' | '.join(PROVIDERS)} (%(default)s)"
    )
    parser.add_argument("-n", type=int, default=1, metavar="N", help="how many machines (%(default)s)")
    parser.add_argument("--vm-type", default="", metavar="T", help="instance type, e.g. m7i.large")
    parser.add_argument("--cpu", type=int, default=0, metavar="C", help="at least C vCPUs (instead of --vm-type)")
    parser.add_argument("--memory", type=float, default=0, metavar="M", help="at least M GiB of memory")
    parser.add_argument("--gpu", action="store_true", help="an NVIDIA GPU machine (CUDA lock)")
    parser.add_argument("--arm", action="store_true", help="an aarch64 machine")
    parser.add_argument("--region", default="", metavar="R", help="cloud region (aws)")
    parser.add_argument(
        "--keepalive", default="20m", metavar="D", help="machines stop after this long idle (%(default)s)"
    )
    parser.add_argument(
        "--max-lifetime", default="12h", metavar="D", help="machines stop after this long, even busy (%(default)s)"
    )
    parser.add_argument(
        "--spot-policy", default="on-demand", metavar="P", help="on-demand | spot | spot_with_fallback (%(default)s)"
    )
    parser.add_argument(
        "--from", dest="source", default=None, metavar="PATH", help="environment to lock (default: the running one)"
    )
    parser.add_argument(
        "--extra-ca-cert",
        dest="extra_ca_certs",
        action="append",
        default=[],
        metavar="PEM",
        help="a CA certificate the machines must trust (TLS-intercepting proxies); repeatable",
    )
    parser.add_argument("--cluster", default=None, metavar="NAME", help="cluster name (default: a fresh one)")
    parser.add_argument(
        "--pypi-only", action="store_true", help="lock a conda environment from PyPI alone (see rawvm lock --pypi-only)"
    )
    parser.add_argument(
        "--max-cost",
        default="default",
        metavar="USD",
        help="cap on the launch's worst case (every machine until --max-lifetime), or 'none' "
        "(default: max-cost in pyproject.toml [tool.rawvm], else none)",
    )
    parser.add_argument(
        "--max-cost-action",
        default="",
        choices=["refuse", "shorten"],
        help="over --max-cost: refuse the launch (default) or shorten each machine's lifetime to fit",
    )


def _machine_options(args: argparse.Namespace) -> dict[str, Any]:
    return {
        "provider": args.provider,
        "n": args.n,
        "vm_type": args.vm_type,
        "cpu": args.cpu,
        "memory": args.memory,
        "gpu": args.gpu,
        "arm": args.arm,
        "region": args.region,
        "keepalive": args.keepalive,
        "max_lifetime": args.max_lifetime,
        "spot_policy": args.spot_policy,
        "source": args.source,
        "cluster": args.cluster,
        "extra_ca_certs": args.extra_ca_certs,
        "pypi_only": args.pypi_only,
        "max_cost": args.max_cost,
        "max_cost_action": args.max_cost_action,
    }


def _run(args: argparse.Namespace) -> int:
    from rawvm import api

    result = api.run(args.cmd, **_machine_options(args))
    return result.exit_code


def _up(args: argparse.Namespace) -> int:
    from rawvm import api

    record = api.up(**_machine_options(args))
    print(record.name)
    return 0


def _ago(seconds: float) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{int(seconds // size)}{unit} ago"
    return f"{int(seconds)}s ago"


def _ls(args: argparse.Namespace) -> int:
    from rawvm import api

    views = api.ls()
    if args.json:
        print(api.ls_json(views))
        return 0
    if not views:
        print("no clusters", file=sys.stderr)
        return 0
    from rich.console import Console
    from rich.table import Table

    table = Table(box=None)
    for column in ("cluster", "provider", "machines", "running", "created", "$/h", "cost so far"):
        table.add_column(column)
    now = time.time()
    for v in views:
        if v.provider in ("local", "qemu"):
            price = total = "free"
        elif not v.price_per_hour:
            price = total = "unknown"
        else:
            more = " + unknown" if v.price_unknown else ""
            price, total = f"{v.price_per_hour:.4f}{more}", f"${v.cost_so_far:.4f}{more}"
        row = (v.name, v.provider, str(len(v.machines)), str(v.running), _ago(now - v.created), price, total)
        table.add_row(*row)
    Console().print(table)
    return 0


def _logs(args: argparse.Namespace) -> int:
    from rawvm import api

    return api.logs(args.cluster, follow=args.follow)


def _down(args: argparse.Namespace) -> int:
    from rawvm import api

    count = api.down(args.cluster)
    print(f"rawvm: stopped {count} machine{'s' if count != 1 else ''} of {args.cluster}", file=sys.stderr)
    return 0


def register(subparsers: Any) -> None:
    run = subparsers.add_parser(
        "run",
        help="run a command on fresh machines in this environment",
        description="Lock this environment, start machines, run CMD on each, stream its output, exit with its "
        "code. The machines stop by themselves after --keepalive idle.",
        usage="rawvm run [options] -- CMD ...",
    )
    _machine_flags(run)
    run.add_argument("cmd", nargs=argparse.REMAINDER, metavar="CMD", help="the command, after '--'")
    run.set_defaults(func=_run)

    up = subparsers.add_parser("up", help="start machines and wait until they are ready; prints the cluster name")
    _machine_flags(up)
    up.set_defaults(func=_up)

    ls = subparsers.add_parser("ls", help="list clusters and their machines")
    ls.add_argument("--json", action="store_true", help="machine-readable output")
    ls.set_defaults(func=_ls)

    logs = subparsers.add_parser("logs", help="print the latest task's output on each machine of a cluster")
    logs.add_argument("cluster", metavar="CLUSTER")
    logs.add_argument("--follow", "-f", action="store_true", help="keep printing until the task ends")
    logs.set_defaults(func=_logs)

    down = subparsers.add_parser("down", help="stop every machine of a cluster now")
    down.add_argument("cluster", metavar="CLUSTER")
    down.set_defaults(func=_down)
