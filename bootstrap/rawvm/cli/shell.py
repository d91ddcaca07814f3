"""``rawvm shell CLUSTER [MACHINE] [-- CMD]``: a terminal on a machine over the agent API (rawvm.interactive.shell)."""

from __future__ import annotations

import argparse
import re
from typing import Any

from rawvm.errors import UsageError

_MACHINE = re.compile(r"(.+-)?m[0-9]+")  # m0, or a full id rawvm-ab12cd-m0


def split_rest(rest: list[str]) -> tuple[str, list[str]]:
    """(MACHINE, CMD) from what follows CLUSTER. argparse drops a '--' that comes first, so without one left a
    lone machine-like word is the machine and anything else is the command."""
    if "--" in rest:
        at = rest.index("--")
        if at > 1:
            raise UsageError(f"rawvm shell CLUSTER [MACHINE] [-- CMD]: unexpected {' '.join(rest[1:at])!r}")
        return (rest[0] if at else ""), rest[at + 1 :]
    if len(rest) == 1 and _MACHINE.fullmatch(rest[0]):
        return rest[0], []
    return "", rest


def _shell(args: argparse.Namespace) -> int:
    from rawvm.interactive.shell import session
    from rawvm.session import run_sync

    machine, command = split_rest(args.rest)
    return run_sync(session(args.cluster, machine, command))


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
    parser.add_argument(
        "rest", nargs=argparse.REMAINDER, metavar="[MACHINE] [-- CMD]", help="m0, m1, ... (default: the first)"
    )
    parser.set_defaults(func=_shell)
