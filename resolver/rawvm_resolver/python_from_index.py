"""Which Python a freeze of exact pins was made for, asked of the package index when the input records none.

A plain ``pip freeze`` (``numpy==1.24.4``, ``pandas==1.5.3``) names no Python, no wheel file and no marker, and
locking it for the running Python (3.13) fails or builds numpy from source: numpy 1.24.4 has wheels up to cp311
only. The index knows which wheels each pinned release has, and the newest Python every pin has a wheel for is the
Python the freeze was most likely made on (python_choice decides from those names, as it does from a lock's own
listed wheels). Pins whose release has a pure wheel, or only an sdist, say nothing.

Asked only when the input has exact index pins and nothing else tells the Python (no ``--python``, no wheel tags,
markers or ranges), and only by the lock, never by reading an input (that stays offline). An index that cannot be
asked, or does not answer within ``DEADLINE_S``, leaves the running Python with a reason that says so: never an
error, never a long wait.
"""

from __future__ import annotations

import dataclasses
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

from packaging.version import InvalidVersion, Version

from rawvm_resolver.availability import PYPI_SIMPLE, IndexFile, index_files
from rawvm_resolver.environment import Environment
from rawvm_resolver.errors import ResolverError
from rawvm_resolver.index_http import TransportError, client
from rawvm_resolver.python_choice import NO_PYTHON_RECORDED, PythonChoice, choose_python, running_python, wheel_pythons

__all__ = ["DEADLINE_S", "infer_python_from_index", "python_from_index"]

DEADLINE_S = 20.0  # the whole inference; past it the lock goes on with the running Python
_THREADS = 8  # lookups in parallel: a 300-line freeze takes seconds, not minutes
_PROBE_TIMEOUT_S = 10.0
_JSON = "application/vnd.pypi.simple.v1+json"


def infer_python_from_index(env: Environment) -> Environment:
    """``env`` with its Python inferred from the index, when it records none and has exact index pins; else as is."""
    if env.platform.python_from != NO_PYTHON_RECORDED:
        return env
    pins = {
        dist.name: dist.version
        for dist in env.distributions
        if dist.source.kind == "index" and dist.version and not dist.marker  # a marker: maybe not for this target
    }
    if not pins:
        return env
    index_url, extras = "", tuple[str, ...]()
    if env.kind == "requirements" and Path(env.origin).is_file():
        from rawvm_resolver.sources import requirement_file_indexes  # lazy: only requirements files name indexes

        index_url, extras = requirement_file_indexes(Path(env.origin))
    choice = python_from_index(pins, index_url or PYPI_SIMPLE, extras)
    platform = dataclasses.replace(env.platform, python=choice.python, python_from=choice.reason)
    return dataclasses.replace(env, platform=platform)


def python_from_index(
    pins: Mapping[str, str], index_url: str = PYPI_SIMPLE, extras: Sequence[str] = (), deadline_s: float = DEADLINE_S
) -> PythonChoice:
    """The newest Python every pin (name -> exact version) has a wheel for on the index; the running one, with
    the reason, when no pin needs a particular Python, none fits them all, or the index cannot be asked."""
    running = running_python()
    started = time.monotonic()
    try:
        _probe(index_url, next(iter(pins)))
    except (TransportError, OSError, ResolverError) as exc:
        return PythonChoice(running, f"{_unasked(index_url)} ({_one_line(exc)}): the running one")
    found, failure = _wheel_names(pins, (index_url, *extras), deadline_s - (time.monotonic() - started))
    if failure:
        return PythonChoice(running, f"{_unasked(index_url)} ({failure}): the running one")
    specific = [names for names in found.values() if wheel_pythons(names) is not None]
    if not specific:
        return PythonChoice(
            running,
            f"the input records no Python and every pin installs on any Python 3 ({index_url}): the running one",
        )
    choice = choose_python(wheel_names=specific)
    if choice.reason == NO_PYTHON_RECORDED:
        return PythonChoice(
            running,
            f"the input records no Python and no Python has a wheel of every pin on {index_url}: the running one",
        )
    tag = f"cp{choice.python.replace('.', '')}"
    return PythonChoice(
        choice.python, f"the newest Python every pinned package has a wheel for on {index_url} ({tag} wheels)"
    )


def _unasked(index_url: str) -> str:
    return f"the input records no Python and the index {index_url} could not be asked which wheels its pins have"


def _one_line(error: BaseException) -> str:
    text = str(error).splitlines()[0] if str(error) else type(error).__name__
    return text[:200]


def _probe(index_url: str, name: str) -> None:
    """One request without retries: an index that is down or refuses costs a moment, not every pin's retries."""
    client().get(f"{index_url.rstrip('/')}/{name}/", headers={"Accept": _JSON}, timeout=_PROBE_TIMEOUT_S)


def _wheel_names(
    pins: Mapping[str, str], indexes: Sequence[str], deadline_s: float
) -> tuple[dict[str, list[str]], str]:
    """Per pin, the Linux-installable wheel names of its release; or a failure ("" when none).

    Daemon threads, not an executor: a lookup still retrying past the deadline must not hold the process's exit.
    """
    todo = list(pins.items())
    found: dict[str, list[str]] = {}
    failures: list[str] = []
    guard = threading.Lock()
    finished = threading.Event()

    def work() -> None:
        while True:
            with guard:
                if not todo or failures:
                    return
                name, version = todo.pop()
            try:
                names = _release_wheels(name, version, indexes)
            except (ResolverError, TransportError, OSError) as exc:
                with guard:
                    failures.append(_one_line(exc))
                finished.set()
                return
            with guard:
                found[name] = names
                if len(found) == len(pins):
                    finished.set()

    for number in range(min(_THREADS, len(pins))):
        threading.Thread(target=work, name=f"rawvm-python-from-index-{number}", daemon=True).start()
    if not finished.wait(max(deadline_s, 0.0)):
        return {}, f"no answer for every pin within {deadline_s:.0f} s"
    with guard:
        return dict(found), failures[0] if failures else ""


def _release_wheels(name: str, version: str, indexes: Sequence[str]) -> list[str]:
    """The wheel file names of ``name==version`` that install on Linux, from the first index that has the name."""
    try:
        wanted = Version(version)
    except InvalidVersion:
        return []
    files: tuple[IndexFile, ...] = ()
    for index_url in indexes:
        files = index_files(name, index_url)
        if files:
            break
    return [file.filename for file in files if file.version == wanted and _installs_on_linux(file)]


def _installs_on_linux(file: IndexFile) -> bool:
    """A wheel for Linux or any platform (the target is Linux: a macOS-only cp312 wheel says nothing about it)."""
    return any(tag.platform == "any" or "linux" in tag.platform for tag in file.tags)
