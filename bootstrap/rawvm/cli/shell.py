"""``rawvm shell CLUSTER [MACHINE] [-- CMD]``: a terminal on a machine over the agent API (rawvm.interactive.shell)."""

from __future__ import annotations

import argparse
from typing import Any


def _shell(args: argparse.Namespace) -> int:
    from rawvm.interactive.shell import session
    from rawvm.session import run_sync

    command = args.cmd[1:] if args.cmd[:1] == ["--"] else args.cmd
    return run_sync(session(args.cluster, args.machine or "", command))


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "shell",
        help="open a shell (or run CMD) on a machine of a cluster",
        description="A login shell on the machine's pseudo-terminal, in the task environment and work dir, over "
        "the agent's mutual-TLS API (no SSH). With '-- CMD' the machine's /bin/sh runs CMD (words joined with "
        "spaces, as ssh does). Exits with the remote exit code.",
        usage="rawvm shell CLUSTER [MACHINE] [-- CMD ...]",
    )
    parser.add_argument("cluster", metavar="CLUSTER")
    parser.add_argument("machine", metavar="MACHINE", nargs="?", help="m0, m1, ... (default: the first)")
    parser.add_argument("cmd", nargs=argparse.REMAINDER, metavar="CMD", help="a command, after '--'")
    parser.set_defaults(func=_shell)
