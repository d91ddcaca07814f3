"""User-facing errors: the CLI prints ``str(error)`` on one line and exits with ``exit_code``, no traceback."""

from __future__ import annotations


class RawvmError(Exception):
    """A problem the user can fix. The message names the problem and what to do."""

    exit_code = 1


class UsageError(RawvmError):
    """Bad command-line input (unknown provider, bad duration, ...)."""

    exit_code = 2
