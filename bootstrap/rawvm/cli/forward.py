"""``rawvm forward CLUSTER [MACHINE] LOCAL:REMOTE``: a machine's loopback port on this host's (rawvm.interactive)."""

from __future__ import annotations

import argparse
from typing import Any


def _forward(args: argparse.Namespace) -> int:
    from rawvm.interactive.forward import forward
    from rawvm.session import run_sync, say

    if args.ports is None:  # one positional given: it is the ports, the machine is the first
        args.machine, args.ports = None, args.machine
    try:
        run_sync(forward(args.cluster, args.machine or "", args.ports or "", say))
    except KeyboardInterrupt:
        say("forward ended")
    return 0


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "forward",
        help="forward a local port to a port on a machine's loopback",
        description="Listen on 127.0.0.1:LOCAL; each connection is tunnelled through the agent's mutual-TLS API "
        "to 127.0.0.1:REMOTE on the machine. Nothing is opened in any security group. Ctrl-C ends it.",
        usage="rawvm forward CLUSTER [MACHINE] LOCAL:REMOTE",
    )
    parser.add_argument("cluster", metavar="CLUSTER")
    parser.add_argument("machine", metavar="MACHINE", nargs="?", help="m0, m1, ... (default: the first)")
    parser.add_argument("ports", metavar="LOCAL:REMOTE", nargs="?")
    parser.set_defaults(func=_forward)
