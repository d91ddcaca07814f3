"""Resolver errors. The CLI prints ``str(error)`` as one line and exits with ``exit_code``."""

from __future__ import annotations


class ResolverError(Exception):
    """The environment cannot be locked for the target (exit 1). The message says why and what to do."""

    exit_code = 1


class InputError(ResolverError):
    """Bad input: unknown platform, a path that is no environment, ... (exit 2)."""

    exit_code = 2


class ConflictError(ResolverError):
    """uv found no solution: ``str()`` is a short line with a suggestion where one fits, ``detail`` uv's whole
    explanation (what ``--explain`` prints): a conflict's proof runs to thousands of characters, which no one
    reads on one line."""

    def __init__(self, message: str, detail: str) -> None:
        super().__init__(message)
        self.detail = detail
