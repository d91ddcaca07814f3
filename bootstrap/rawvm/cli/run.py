"""``rawvm run``, ``up``, ``ls``, ``logs``, ``down``: the front door on the command line (see rawvm.commands)."""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any

from rawvm.cli.flags import launch_options, machine_flags


def _run(args: argparse.Namespace) -> int:
    from rawvm import commands

    result = commands.run_command(args.cmd, launch_options(args), torchrun=args.torchrun, sync=args.sync)
    if args.timings:
        from rawvm.boot_timings import phase_line

        launch_lines = ", ".join(f"{name} {seconds:.1f} s" for name, seconds in result.timings.items())
        print(f"rawvm: timings: {launch_lines}", file=sys.stderr)
        for machine in result.machines:
            print(f"rawvm: {phase_line(machine)}", file=sys.stderr)
    return result.exit_code


def _up(args: argparse.Namespace) -> int:
    from rawvm import commands

    record = commands.up(launch_options(args))
    print(record.name)
    return 0


def _ago(seconds: float) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{int(seconds // size)}{unit} ago"
    return f"{int(seconds)}s ago"


def _ls(args: argparse.Namespace) -> int:
    from rawvm import commands

    views = commands.ls()
    if args.json:
        print(commands.ls_json(views))
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
    from rawvm import commands

    return commands.logs(args.cluster, follow=args.follow)


def _down(args: argparse.Namespace) -> int:
    from rawvm import commands

    count = commands.down(args.cluster)
    print(f"rawvm: stopped {count} machine{'s' if count != 1 else ''} of {args.cluster}", file=sys.stderr)
    return 0


def register(subparsers: Any) -> None:
    run = subparsers.add_parser(
        "run",
        help="run a command on fresh machines in this environment",
        description="Lock this environment, start machines, run CMD on each, stream its output, exit with its "
        "code. The machines stop by themselves after --keepalive idle. With --cluster, the project files changed "
        "since its machines last received them are sent first. Ctrl-C cancels the tasks; a second one stops "
        "the machines.",
        usage="rawvm run [options] -- CMD ...",
    )
    machine_flags(run)
    run.add_argument(
        "--torchrun", action="store_true", help="run CMD under torchrun on every node (ranks, head as master)"
    )
    run.add_argument(
        "--timings",
        action="store_true",
        help="after the run, print where the time went: the laptop's steps and each machine's start-up phases",
    )
    run.add_argument(
        "--no-sync",
        dest="sync",
        action="store_false",
        help="with --cluster: run the files the machines have, without sending the ones changed here",
    )
    run.add_argument("cmd", nargs=argparse.REMAINDER, metavar="CMD", help="the command, after '--'")
    run.set_defaults(func=_run)

    up = subparsers.add_parser(
        "up",
        help="start machines and wait until they are ready; prints the cluster name",
        description="Lock this environment, start machines and wait until every one is ready, then print the "
        "cluster's name for 'rawvm run --cluster NAME', 'logs', 'top' and 'down'. The machines stop by themselves "
        "after --keepalive idle.",
    )
    machine_flags(up)
    up.set_defaults(func=_up)

    ls = subparsers.add_parser(
        "ls",
        help="list clusters and their machines",
        description="List the clusters started from here with their provider, machines, how many still run, "
        "their price and cost so far. A cluster whose machines have all stopped is cleaned up and forgotten.",
    )
    ls.add_argument("--json", action="store_true", help="machine-readable output")
    ls.set_defaults(func=_ls)

    logs = subparsers.add_parser(
        "logs",
        help="print the latest task's output on each machine of a cluster",
        description="Print the latest task's output on each machine of CLUSTER (prefixed [m0], [m1], ... when "
        "there are several); a stopped machine's output comes from what it flushed before powering off.",
    )
    logs.add_argument("cluster", metavar="CLUSTER")
    logs.add_argument("--follow", "-f", action="store_true", help="keep printing until the task ends")
    logs.set_defaults(func=_logs)

    down = subparsers.add_parser(
        "down",
        help="stop every machine of a cluster now",
        description="Stop every machine of CLUSTER now instead of after its keepalive, and remove what was made "
        "for it (aws: the security group and launch template).",
    )
    down.add_argument("cluster", metavar="CLUSTER")
    down.set_defaults(func=_down)
