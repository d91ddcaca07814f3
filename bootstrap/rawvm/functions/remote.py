"""``@rawvm.function``: call a plain Python function on machines, from a script or a notebook.

    @rawvm.function(n=3, keepalive="30s")
    def square(x): return x * x

    square(4)                      # 16, computed on a machine
    square.submit(4).result()      # a concurrent.futures.Future
    square.map(range(100))         # [0, 1, 4, ...] in input order, spread over up to 3 machines

The function and its arguments travel with cloudpickle: a function of one of the project's modules by reference
(the module is in the bundle's code.tar.gz and imports on the machine, where its ``@rawvm.function`` lines leave
the functions alone), one from ``__main__``, a notebook or elsewhere by value.
Results come back the same way; an exception raised remotely is raised here as itself, chained from a
``RemoteTraceback`` that shows the remote frames. The machines stay warm for ``keepalive`` after the last call,
and the next call with the same environment, code and options reuses them (see ``rawvm.functions.pool``).
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import functools
import os
import pickle
import sys
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, Generic, Literal, ParamSpec, TypeVar, overload

import cloudpickle
from rawvm_agent.call_worker import REFERENCE

from rawvm.commands import down
from rawvm.errors import UsageError
from rawvm.functions.chunks import ChunkSizer, MapOptions, run_map
from rawvm.functions.pool import MAX_CALL_BYTES, Pool, PoolOptions, forget, on_loop, pool_for, reuse_key
from rawvm.functions.sources import with_sources
from rawvm.options import LaunchOptions

P = ParamSpec("P")
R = TypeVar("R")

PROGRESS_MIN_CALLS = 100
_CLOUDPICKLE_WHY = "@rawvm.function sends calls and results with cloudpickle, same version as the caller's"


class RemoteFunction(Generic[P, R]):
    """A function that runs on machines; see the module docstring."""

    def __init__(self, fn: Callable[P, R], options: PoolOptions, project_dir: Path) -> None:
        functools.update_wrapper(self, fn)
        self.fn = fn
        self.options = options
        self.project_dir = project_dir
        self._pool: Pool | None = None
        self._sizer = ChunkSizer()  # what this function's maps have shown: the next map's chunks start from it

    # -- the machines -------------------------------------------------------------------------------------------

    def _get_pool(self) -> Pool:
        if self._pool is None:
            self._pool = pool_for(reuse_key(self.options, self.project_dir), self.options, self.project_dir)
        return self._pool

    @property
    def cluster(self) -> str:
        """The cluster running the calls; "" before the first call."""
        return self._pool.cluster if self._pool else ""

    @property
    def launches(self) -> int:
        """How many clusters this function's pool has launched in this process (reuse keeps it at 1)."""
        return self._pool.launches if self._pool else 0

    def down(self) -> None:
        """Stop the machines now instead of after the keepalive."""
        if self._pool is None:
            return
        pool, self._pool = self._pool, None
        forget(pool)
        if pool.cluster:
            from rawvm import clusters

            if clusters.exists(pool.cluster):
                down(pool.cluster)
        on_loop(pool.close()).result(timeout=10)

    # -- calls --------------------------------------------------------------------------------------------------

    def _pickled_function(self) -> bytes:
        """By reference when the function's module is a file of the project (so code.tar.gz has it and the
        machine imports it: remote tracebacks show its file and lines, its module state lives on); else by
        value (``__main__``, a notebook cell, a module from elsewhere)."""
        module = sys.modules.get(getattr(self.fn, "__module__", "") or "")
        qualname = getattr(self.fn, "__qualname__", "")
        file = getattr(module, "__file__", None)
        if module is not None and file and module.__name__ != "__main__" and "<locals>" not in qualname:
            target: Any = module
            for part in qualname.split("."):
                target = getattr(target, part, None)
            if target is self and Path(file).resolve().is_relative_to(self.project_dir.resolve()):
                reference: bytes = cloudpickle.dumps((REFERENCE, module.__name__, qualname))
                return reference
        by_value: bytes = cloudpickle.dumps(with_sources(self.fn))  # its file's text: tracebacks show lines
        return by_value

    def _payloads(self, arguments: Iterable[tuple[tuple[Any, ...], dict[str, Any]]]) -> list[bytes]:
        blob = self._pickled_function()
        name = getattr(self.fn, "__name__", "the function")
        payloads = []
        for args, kwargs in arguments:
            call = (blob, args, kwargs)
            payload = pickle.dumps(call, protocol=5) if plain(args) and plain(kwargs) else cloudpickle.dumps(call)
            if len(payload) > MAX_CALL_BYTES:
                raise UsageError(
                    f"a call to {name} pickles to {len(payload) >> 20} MiB, over the "
                    f"{MAX_CALL_BYTES >> 20} MiB limit: pass big data as a file or URL instead"
                )
            payloads.append(payload)
        return payloads

    def _start(self, payloads: Sequence[bytes]) -> list[concurrent.futures.Future[R]]:
        pool = self._get_pool()
        queued = on_loop(pool.run(payloads, cloudpickle.loads)).result()
        return [_bridge(f) for f in queued]

    def submit(self, *args: P.args, **kwargs: P.kwargs) -> concurrent.futures.Future[R]:
        """Start one call; its future."""
        return self._start(self._payloads([(args, kwargs)]))[0]

    def __call__(self, *args: P.args, **kwargs: P.kwargs) -> R:
        return self.submit(*args, **kwargs).result()

    def local(self, *args: P.args, **kwargs: P.kwargs) -> R:
        """Call the plain function here."""
        return self.fn(*args, **kwargs)

    @overload
    def map(self, items: Iterable[Any], *, errors: Literal["raise"] = "raise") -> list[R]: ...
    @overload
    def map(self, items: Iterable[Any], *, errors: Literal["skip"]) -> list[R]: ...

    def map(self, items: Iterable[Any], *, errors: Literal["raise", "skip"] = "raise") -> list[R]:
        """``[f(x) for x in items]``, computed on up to ``n`` machines, in input order.

        ``errors="raise"``: the first failed call (in input order) raises here, calls not yet sent are dropped.
        ``errors="skip"``: failed calls are left out of the list.
        """
        if errors not in ("raise", "skip"):
            raise UsageError(f"errors={errors!r}: choose 'raise' or 'skip'")
        items = list(items)
        if not items:
            return []  # nothing to run: no machines either
        pool = self._get_pool()
        name = getattr(self.fn, "__name__", "calls")
        results: list[R] = []
        with _map_progress(len(items), name) as advance:
            options = MapOptions(
                self._sizer, cloudpickle.dumps, cloudpickle.loads, _plain_item, errors == "raise", name, advance
            )
            # One crossing to the loop thread for the whole map; the calls travel in chunks (functions/chunks.py).
            waiting = on_loop(run_map(pool, self._pickled_function(), items, options))
            try:
                outcomes = waiting.result()
            except BaseException:  # Ctrl-C: the calls not sent yet are dropped, those sent are cancelled
                waiting.cancel()
                on_loop(_drop(pool)).result()
                raise
        for ok, value in outcomes:
            if ok:
                results.append(value)
            elif errors == "raise":
                raise value
        return results


def plain(value: Any, depth: int = 0) -> bool:
    """Only builtin scalars and small containers of them: the C pickler is enough and ~8x faster."""
    kind = type(value)
    if kind in _SCALARS:
        return True
    if depth == 0 and kind in (tuple, list) and len(value) <= 64:
        return all(plain(v, 1) for v in value)
    if depth == 0 and kind is dict and len(value) <= 64:
        return all(type(k) is str and plain(v, 1) for k, v in value.items())
    return False


_SCALARS = frozenset({int, float, complex, str, bytes, bool, type(None)})


def _plain_item(item: Any) -> bool:
    """A map item the C pickler can take: what ``plain`` says of a call's arguments ``(item,)``."""
    return type(item) in _SCALARS or plain(item, 0)


@contextlib.contextmanager
def _map_progress(total: int, name: str) -> Iterator[Callable[[int], None] | None]:
    """A rich progress bar on stderr while a map of more than a few calls runs, on a terminal only."""
    if total < PROGRESS_MIN_CALLS or not sys.stderr.isatty():
        yield None
        return
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    with Progress(
        TextColumn(f"rawvm: {name}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=Console(stderr=True),
        transient=True,
    ) as progress:
        task = progress.add_task("calls", total=total)
        yield lambda calls: progress.advance(task, calls)  # called on the loop thread: rich's Progress takes that


async def _drop(pool: Pool) -> int:
    """Ctrl-C in a map: forget the calls not sent, and stop those the machines hold."""
    dropped = pool.drop_unsent()
    await pool.cancel_remote()
    return dropped


def _bridge(future: Any) -> concurrent.futures.Future[Any]:
    """An asyncio future of the background loop as a concurrent.futures one, usable from any thread."""
    out: concurrent.futures.Future[Any] = concurrent.futures.Future()
    out.set_running_or_notify_cancel()

    def copy(done: Any) -> None:
        if done.cancelled():
            out.cancel()
        elif done.exception() is not None:
            out.set_exception(done.exception())
        else:
            out.set_result(done.result())

    future.get_loop().call_soon_threadsafe(future.add_done_callback, copy)
    return out


def on_a_machine() -> bool:
    """True inside a call worker on a machine: there, importing the user's module runs ``@rawvm.function`` again,
    and the function must stay a plain function (a call it makes to another decorated function runs in place)."""
    return bool(os.environ.get("RAWVM_CALLS_WORKER"))


def remote_function(
    fn: Callable[P, R] | None, launch_options: LaunchOptions, *, packages: Sequence[str] = (), slots: int = 0
) -> Any:
    """What ``@rawvm.function`` makes of ``fn`` (or, without ``fn``, the decorator that does): calls run on the
    machines ``launch_options`` describe, ``slots`` at a time on each (0: its cores; 1 with a GPU), in the locked
    environment plus ``packages``. The project (code.tar.gz) is the current directory at decoration."""
    if slots < 0:
        raise UsageError(f"slots={slots}: the calls per machine must be at least 1 (0: one per core)")
    source = launch_options.environment.source
    if source and not Path(source).expanduser().exists():
        raise UsageError(f"source={str(source)!r}: no such file or directory (a venv, requirements file or project)")
    if isinstance(packages, str):
        raise UsageError(f"packages={packages!r}: give a list of requirements, e.g. packages=['humanize']")
    requirements = [(line, "asked for by @rawvm.function(packages=...)") for line in packages]
    requirements.append((f"cloudpickle=={cloudpickle.__version__}", _CLOUDPICKLE_WHY))
    environment = dataclasses.replace(
        launch_options.environment,
        source=str(Path(source).expanduser().resolve()) if source else None,
        extra_requirements=tuple(requirements),
    )
    options = PoolOptions(
        launch=launch_options.replace(environment=environment),
        slots=slots or (1 if launch_options.request.gpu else 0),
    )
    project_dir = Path.cwd()

    def wrap(f: Callable[P, R]) -> RemoteFunction[P, R]:
        if not callable(f):
            raise UsageError("@rawvm.function decorates a function")
        return RemoteFunction(f, options, project_dir)

    return wrap(fn) if fn is not None else wrap
