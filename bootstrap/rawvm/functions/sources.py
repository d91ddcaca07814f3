"""The source text that travels with a function sent by value, so its remote traceback reads like a local one.

cloudpickle sends a function of ``__main__`` or a notebook by value and names its code's file ``<dynamic-code>``;
the machine has neither the file's name nor its text. ``with_sources`` sends both along (the worker's
``call_worker._with_sources`` puts them back): the file the function is written in, and those of the module-level
functions it calls. A notebook cell's text comes from linecache too, where IPython keeps it.
"""

from __future__ import annotations

import linecache
import sys
import types
from collections.abc import Callable, Iterator
from typing import Any

from rawvm_agent.call_worker import SOURCED

__all__ = ["MAX_SOURCE_CHARS", "with_sources"]

MAX_SOURCE_CHARS = 1 << 20  # a call carries at most this much source text; past it, frames keep <dynamic-code>


def _names(code: types.CodeType) -> Iterator[str]:
    """The global names ``code`` and the functions nested in it refer to."""
    yield from code.co_names
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            yield from _names(const)


def importable(fn: types.FunctionType) -> bool:
    """cloudpickle sends ``fn`` by reference: the machine imports it (with its real file), nothing to add."""
    module = sys.modules.get(fn.__module__ or "")
    if module is None or fn.__module__ == "__main__":
        return False
    target: Any = module
    for part in fn.__qualname__.split("."):
        target = getattr(target, part, None)
    return target is fn


def with_sources(fn: Callable[..., Any]) -> Any:
    """``(SOURCED, fn, files, sources)`` for cloudpickle, or ``fn`` itself when it travels by reference or has no
    source to send (a builtin, a callable object, ``python -c``)."""
    if not isinstance(fn, types.FunctionType) or importable(fn):
        return fn
    called = [(name, fn.__globals__.get(name)) for name in dict.fromkeys(_names(fn.__code__))]
    functions = [("", fn)] + [
        (name, f) for name, f in called if isinstance(f, types.FunctionType) and f.__module__ == fn.__module__
    ]
    files: list[tuple[str, str]] = []
    sources: dict[str, str] = {}
    size = 0
    for name, function in functions:
        filename = function.__code__.co_filename
        if filename not in sources:
            text = "".join(linecache.getlines(filename, function.__globals__))
            if not text or size + len(text) > MAX_SOURCE_CHARS:
                continue
            sources[filename] = text
            size += len(text)
        files.append((name, filename))
    return (SOURCED, fn, files, sources) if files else fn
