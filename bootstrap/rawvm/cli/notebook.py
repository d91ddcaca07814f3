"""``rawvm notebook [machine options]``: JupyterLab on a machine, the project synced both ways (rawvm.interactive)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from rawvm.cli.flags import launch_options, machine_flags
from rawvm.errors import UsageError


def _notebook(args: argparse.Namespace) -> int:
    from rawvm.interactive.notebook import attach, cluster_for_notebook, stops_after
    from rawvm.session import run_sync, say

    if not 0 <= args.port <= 65535:
        raise UsageError(f"--port {args.port}: a port is 0 (any free one) to 65535")
    options = launch_options(args)
    record = cluster_for_notebook(options)

    def show(url: str) -> None:  # the one line on stdout: scripts (and tests) read the URL from it
        print(url, flush=True)

    try:
        run_sync(attach(record.name, Path.cwd(), args.port, not args.no_browser, say, show))
    except KeyboardInterrupt:
        say(stops_after(record.name))
    return 0


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "notebook",
        help="JupyterLab on a machine, in your locked environment, with this directory synced both ways",
        description="Launch a machine (or reuse one with --cluster NAME), start JupyterLab on its loopback and "
        "serve it here on 127.0.0.1 through the agent's mutual-TLS API (nothing is opened in any security "
        "group). While attached, this directory and the machine's work dir stay in sync both ways. Ctrl-C "
        "detaches: JupyterLab stops and the machine idles off after its keepalive.",
        usage="rawvm notebook [--port N] [--no-browser] [machine options]",
    )
    parser.add_argument("--port", type=int, default=0, metavar="N", help="the local port (default: any free one)")
    parser.add_argument("--no-browser", action="store_true", help="print the URL without opening a browser")
    machine_flags(parser, machines="how many machines (JupyterLab runs on the first)")
    parser.set_defaults(func=_notebook)
