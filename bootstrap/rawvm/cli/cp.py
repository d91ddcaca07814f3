"""``rawvm cp SRC DST``: copy files and directories to or from a machine (rawvm.interactive.copy)."""

from __future__ import annotations

import argparse
from typing import Any


def _cp(args: argparse.Namespace) -> int:
    from rawvm.interactive.copy import copy
    from rawvm.session import run_sync, say

    say(run_sync(copy(args.source, args.destination, args.cluster or "")))
    return 0


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "cp",
        help="copy files or directories to or from a machine (MACHINE:PATH on one side)",
        description="Copy SRC to DST, one of them MACHINE:PATH (e.g. m0:data/, relative to the task work dir "
        "unless absolute). Directories copy recursively; 'dir/' copies what dir holds. Streamed, each file "
        "sha256-checked before it is renamed into place.",
        usage="rawvm cp [--cluster NAME] SRC DST",
    )
    parser.add_argument("source", metavar="SRC")
    parser.add_argument("destination", metavar="DST")
    parser.add_argument("--cluster", "-c", metavar="NAME", help="the cluster (default: the only one recorded)")
    parser.set_defaults(func=_cp)
