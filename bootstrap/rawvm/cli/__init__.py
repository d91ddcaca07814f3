"""The ``rawvm`` command. Each command group registers itself from its own module (cli_*.py)."""

from __future__ import annotations

import argparse
import gc
import importlib
import re
import sys
from collections.abc import Callable, Sequence
from typing import Any

from rawvm_resolver.errors import ConflictError, ResolverError

from rawvm.errors import RawvmError

# module -> it defines ``register(subparsers)``; each sets ``func`` on its parser.
_COMMAND_MODULES = (
    "rawvm.cli.lock",
    "rawvm.cli.run",
    "rawvm.cli.cloud",
    "rawvm.cli.top",
    "rawvm.cli.report",
    "rawvm.cli.sweep",
    "rawvm.cli.dask",
    "rawvm.cli.batch",
    "rawvm.cli.shell",  # rawvm shell, cp, forward: a person on a machine (rawvm.interactive)
    "rawvm.cli.cp",
    "rawvm.cli.forward",
    "rawvm.cli.cancel",
    "rawvm.cli.notebook",  # rawvm notebook: JupyterLab on a machine, the project synced both ways
)


# A command's first word -> the module that registers it, so ``rawvm run ...`` builds (and imports) only its own
# parser: the whole parser imports every group's modules, ~70 ms (rawvm.cli.lock alone: the resolver's export and
# the image modules). Only a shortcut: a word missing here (or none, as in ``rawvm --help``) builds them all.
MODULE_OF = {
    **dict.fromkeys(("run", "up", "ls", "logs", "down"), "rawvm.cli.run"),
    **dict.fromkeys(("lock", "export"), "rawvm.cli.lock"),
    "top": "rawvm.cli.top",
    "cancel": "rawvm.cli.cancel",
    "batch": "rawvm.cli.batch",
}


NEGATIVE_VALUE = re.compile(r"^-\d+(\.\d+)?[a-z\d.]*$")  # -5, -0.5, -5m, -1h30m


class _Parser(argparse.ArgumentParser):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # "-5m" is a value, not an option: a negative duration then reaches the duration check and gets its
        # message, where argparse would say "expected one argument" (no rawvm option looks like a number).
        self._negative_number_matcher = NEGATIVE_VALUE

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"rawvm: {message} (see '{self.prog} --help')\n")


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser of every command, or of ``command`` alone when one module registers it (``MODULE_OF``)."""
    parser = _Parser(prog="rawvm", description="Run Python work on raw cloud VMs, and leave nothing running.")
    subparsers = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    only = MODULE_OF.get(command or "")
    for name in (only,) if only else _COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name != name:
                raise
            continue  # a command group not built yet
        module.register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    words = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(words[0] if words and not words[0].startswith("-") else None)
    args = parser.parse_args(words)
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        return func(args)
    except (RawvmError, ResolverError) as exc:
        if isinstance(exc, ConflictError) and getattr(args, "explain", False):
            print(exc.detail, file=sys.stderr)  # a conflict's whole text, then its line
        print(f"rawvm: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("rawvm: interrupted", file=sys.stderr)
        return 130


def command() -> int:
    """``main`` as the ``rawvm`` process runs it (the console script, ``python -m rawvm.cli``): the process ends
    right after, so its objects are moved out of the cyclic collector's reach first (``gc.freeze``): the
    interpreter's exit then skips collecting them (~45 ms of a warm ``rawvm run``'s ~300 ms). Files are flushed,
    atexit handlers and threads are joined as always; only cyclic garbage left at exit is not finalized."""
    try:
        return main()
    finally:
        gc.freeze()


if __name__ == "__main__":
    sys.exit(command())
