"""The call worker: one long-running Python process per slot, in the machine's locked environment.

The agent (``calls.py``) starts it as a task, ``python <state_dir>/calls/worker.py``, with the work dir as its
cwd. It loops: POST the results of its last batch to the agent's ``/v1/calls/work`` over loopback, receive the
next batch of calls, run each. A call is ``cloudpickle.dumps((cloudpickle.dumps(fn), args, kwargs))``; its result is
``cloudpickle.dumps(value)`` (status OK) or ``cloudpickle.dumps((exception or None, type name, message,
formatted traceback))`` (status ERROR). One process serves many calls: no interpreter start per call.

This file is both a module of the agent (the frame codec below, which the agent and the client import) and
a standalone script: it imports only the standard library, plus cloudpickle when run as the worker, because
the locked environment has neither rawvm_agent nor aiohttp.

Frames: a batch is a concatenation of ``!QBI`` headers (call id, status, payload length) each followed by its
payload bytes.
"""

from __future__ import annotations

import os
import pickle
import struct
import sys
import time
import traceback
from collections.abc import Iterable
from typing import Any

HEADER = struct.Struct("!QBI")
OK, ERROR, LOST = 0, 1, 2  # LOST: the worker running the call died; the agent writes that result itself
WORK_PATH = "/v1/calls/work"
FUNCTION_CACHE = 32
_SCALARS = frozenset({int, float, complex, str, bytes, bool, type(None)})
BATCH = 256  # most calls a worker takes per round trip: tiny calls share one HTTP request
BATCH_SECONDS = 0.05  # ...but about this much work at a time, so long calls spread over the workers


class FrameError(ValueError):
    """A batch that does not parse: truncated, or a length past the end."""


def pack(frames: Iterable[tuple[int, int, bytes]]) -> bytes:
    return b"".join(HEADER.pack(call_id, status, len(payload)) + payload for call_id, status, payload in frames)


def unpack(data: bytes) -> list[tuple[int, int, bytes]]:
    frames = []
    view = memoryview(data)
    at = 0
    while at < len(view):
        if at + HEADER.size > len(view):
            raise FrameError("truncated frame header")
        call_id, status, size = HEADER.unpack_from(view, at)
        at += HEADER.size
        if at + size > len(view):
            raise FrameError("frame payload runs past the end of the batch")
        frames.append((call_id, status, bytes(view[at : at + size])))
        at += size
    return frames


CHUNK = "rawvm-chunk"  # (CHUNK, pickled function, [item, ...]): calls of a map sharing one payload (run_chunk)
REFERENCE = "rawvm-function-ref"  # (REFERENCE, module, qualname): a decorated function of an importable module


SOURCED = "rawvm-function-sourced"  # (SOURCED, fn, [(global name or "", file)], {file: text}): by value, with source
DYNAMIC_CODE = "<dynamic-code>"  # the file name cloudpickle gives every function it sends by value


def _renamed(code: Any, filename: str) -> Any:
    """``code`` and the code of every function nested in it, named after ``filename``."""
    import types

    consts = tuple(_renamed(c, filename) if isinstance(c, types.CodeType) else c for c in code.co_consts)
    return code.replace(co_filename=filename, co_consts=consts)


def _with_sources(fn: Any, files: list[tuple[str, str]], sources: dict[str, str]) -> Any:
    """cloudpickle names a by-value function's file ``<dynamic-code>``: give it (and the module-level functions it
    calls) back its real file name, and register the file's text with linecache, so a remote traceback shows
    ``File "/home/me/job.py", line 5`` and that line instead of ``File "<dynamic-code>", line 5``."""
    import linecache

    for filename, text in sources.items():
        linecache.cache[filename] = (len(text), None, text.splitlines(True), filename)  # mtime None: kept
    for name, filename in files:
        target = fn if not name else getattr(fn, "__globals__", {}).get(name)
        code = getattr(target, "__code__", None)
        if code is not None and code.co_filename == DYNAMIC_CODE:
            target.__code__ = _renamed(code, filename)  # type: ignore[union-attr]
    return fn


def _resolve(fn: Any) -> Any:
    """A reference imports the function's module from the work dir (the bundle's code) and finds it there; a
    function sent by value with its source gets its file names back (``_with_sources``)."""
    if isinstance(fn, tuple) and len(fn) == 4 and fn[0] == SOURCED:
        return _with_sources(*fn[1:])
    if not (isinstance(fn, tuple) and len(fn) == 3 and fn[0] == REFERENCE):
        return fn
    import importlib

    _, module_name, qualname = fn
    target: Any = importlib.import_module(module_name)
    for part in qualname.split("."):
        target = getattr(target, part)
    return getattr(target, "__wrapped__", target)


def _ensure_rawvm() -> None:
    """Unpickling a function by reference imports its module, which may ``import rawvm`` for its decorators."""
    if "rawvm" in sys.modules:
        return
    try:
        import rawvm  # noqa: F401  (the environment has rawvm: its decorator wraps, _resolve unwraps)
    except ImportError:
        sys.modules["rawvm"] = _stand_in_rawvm()


def _stand_in_rawvm() -> Any:
    """A ``rawvm`` whose ``function`` decorator leaves the function alone: importing the user's module on the
    machine runs its ``@rawvm.function`` lines, and the locked environment need not have rawvm."""
    import types

    module = types.ModuleType("rawvm")

    def function(fn: Any = None, **_options: Any) -> Any:
        return fn if fn is not None else (lambda f: f)

    module.function = function  # type: ignore[attr-defined]
    return module


def _function(pickler: Any, blob: bytes, functions: dict[bytes, Any]) -> Any:
    fn = functions.get(blob)
    if fn is None:  # a map sends the same pickled function with every call: unpickle it once
        if len(functions) >= FUNCTION_CACHE:
            functions.clear()
        _ensure_rawvm()
        fn = functions[blob] = _resolve(pickler.loads(blob))
    return fn


def _failure(pickler: Any, exc: BaseException, skip_frames: int) -> bytes:
    """An ERROR payload: the exception (or, when it does not pickle, its type name and text) and the formatted
    traceback from the user's frame on (``skip_frames`` of the worker's own frames left out)."""
    if isinstance(exc, KeyboardInterrupt):
        raise exc
    frames = exc.__traceback__
    for _ in range(skip_frames):
        frames = frames.tb_next if frames is not None else None
    formatted = "".join(traceback.format_exception(type(exc), exc, frames))
    described = (None, f"{type(exc).__module__}.{type(exc).__qualname__}", str(exc), formatted)
    try:
        payload: bytes = pickler.dumps((exc, *described[1:]))
    except Exception:  # an exception that does not pickle still travels as its type name and text
        payload = pickler.dumps(described)
    return payload


def run_call(pickler: Any, payload: bytes, functions: dict[bytes, Any]) -> tuple[int, bytes]:
    try:
        call = pickler.loads(payload)
        if call[0] == CHUNK:
            return OK, run_chunk(pickler, call[1], call[2], functions)
        blob, args, kwargs = call
        value = _function(pickler, blob, functions)(*args, **kwargs)
        # Builtin scalars need no cloudpickle: the C pickler is several times faster for tiny results.
        return OK, pickle.dumps(value, protocol=5) if type(value) in _SCALARS else pickler.dumps(value)
    except BaseException as exc:  # the user's function may raise anything, SystemExit included
        return ERROR, _failure(pickler, exc, 1)


def run_chunk(pickler: Any, blob: bytes, items: list[Any], functions: dict[bytes, Any]) -> bytes:
    """Calls of one map in one payload, ``fn(item)`` each: their results in order, and each failed call's ERROR
    payload by its index, so an error stays the one call's. Also the seconds the calls took here, which the
    client uses to size the next chunks."""
    started = time.perf_counter()
    fn = _function(pickler, blob, functions)
    values: list[Any] = []
    errors: list[tuple[int, bytes]] = []
    for index, item in enumerate(items):
        try:
            values.append(fn(item))
        except BaseException as exc:  # the user's function may raise anything, SystemExit included
            values.append(None)
            errors.append((index, _failure(pickler, exc, 1)))
    result = (time.perf_counter() - started, values, errors)
    if all(type(v) in _SCALARS for v in values):
        return pickle.dumps(result, protocol=5)  # tiny results: the C pickler is several times faster
    chunk: bytes = pickler.dumps(result)
    return chunk


def tls_context(ca: str, cert: str, key: str) -> Any:
    """The worker's side of the agent's mutual TLS: pins the cluster CA (``ca``), checks no host name (the
    agent's certificate names no host: the pinned CA is its identity), presents ``cert``/``key``."""
    import ssl

    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.load_verify_locations(cafile=ca)
    ctx.load_cert_chain(cert, key)
    return ctx


def serve(url: str, token: str, worker: str, tls: tuple[str, str, str] | None = None) -> None:
    """Take calls from the agent at ``url`` until it goes away; ``tls`` = (CA, certificate, key) for https."""
    import http.client
    import urllib.parse

    import cloudpickle

    parts = urllib.parse.urlsplit(url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 8470
    connection: http.client.HTTPConnection
    if parts.scheme == "https":
        if tls is None:
            sys.exit("rawvm call worker: an https agent URL without RAWVM_CALLS_CA/CERT/KEY")
        connection = http.client.HTTPSConnection(host, port, context=tls_context(*tls))
    else:
        connection = http.client.HTTPConnection(host, port)
    headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/octet-stream"}
    path = f"{WORK_PATH}?worker={urllib.parse.quote(worker)}&max="
    most = 1  # until the first calls have shown how long they take
    done: list[tuple[int, int, bytes]] = []
    functions: dict[bytes, Any] = {}
    failures = 0
    while True:
        try:
            connection.request("POST", f"{path}{most}", body=pack(done), headers=headers)
            response = connection.getresponse()
            body = response.read()
        except (OSError, http.client.HTTPException):
            failures += 1
            if failures > 20:
                return  # the agent is gone (stopping): so is this worker
            connection.close()
            time.sleep(min(0.05 * failures, 1.0))
            continue
        failures = 0
        if response.status == 410:
            return  # the agent is stopping
        if response.status != 200:
            print(f"rawvm call worker: the agent answered {response.status}: {body[:200]!r}", file=sys.stderr)
            return
        done = []
        started = time.perf_counter()
        for call_id, _, payload in unpack(body):
            status, result = run_call(cloudpickle, payload, functions)
            done.append((call_id, status, result))
        if done:
            each = (time.perf_counter() - started) / len(done)
            most = max(1, min(BATCH, int(BATCH_SECONDS / max(each, 1e-6))))


def main() -> None:
    # The user's code imports from the work dir (the bundle's code), as a task run there would.
    here = os.path.dirname(os.path.abspath(__file__))
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != here]
    sys.path.insert(0, os.getcwd())
    tls_files = tuple(os.environ.pop(f"RAWVM_CALLS_{n}", "") for n in ("CA", "CERT", "KEY"))
    tls = (tls_files[0], tls_files[1], tls_files[2]) if all(tls_files) else None
    token, worker = os.environ.pop("RAWVM_CALLS_TOKEN"), os.environ.get("RAWVM_CALLS_WORKER", "")
    serve(os.environ["RAWVM_CALLS_URL"], token, worker, tls)


if __name__ == "__main__":
    main()
