"""``@rawvm.function`` without machines: input checks, how functions are pickled, results decoded, frames, and the
resolver's extra requirements."""

from __future__ import annotations

import importlib
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import cloudpickle
import pytest
import rawvm
from hypothesis import given
from hypothesis import strategies as st
from rawvm.functions.pool import RemoteError, RemoteTraceback, decode_result
from rawvm.functions.remote import RemoteFunction
from rawvm_agent.call_worker import ERROR, LOST, OK, REFERENCE, FrameError, pack, run_call, unpack
from rawvm_resolver.api import add_extra_requirements
from rawvm_resolver.environment import Distribution, Environment, SourcePlatform
from rawvm_resolver.translate import Plan


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"provider": "gcp"}, "unknown provider"),
        ({"n": 0}, "at least 1"),
        ({"keepalive": "soon"}, "not a duration"),
        ({"packages": "humanize"}, "give a list"),
        ({"source": "no/such/requirements.txt"}, "no such file"),
        ({"slots": -1}, "slots=-1"),
        ({"vm_type": "m7i.large", "cpu": 4}, "not both"),
    ],
)
def test_bad_options_are_one_line_usage_errors(options: dict[str, object], message: str) -> None:
    with pytest.raises(rawvm.UsageError, match=message):
        rawvm.function(**options)


def test_map_refuses_an_unknown_errors_mode_and_maps_nothing_without_machines() -> None:
    remote = rawvm.function(lambda x: x)
    assert remote.map([]) == [] and remote.cluster == "" and remote.launches == 0
    with pytest.raises(rawvm.UsageError, match="errors='ignore'"):
        remote.map([1], errors="ignore")  # type: ignore[call-overload]


@pytest.fixture
def project_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[ModuleType]:
    (tmp_path / "unitwork.py").write_text(
        "import rawvm\n\n@rawvm.function\ndef double(x):\n    return 2 * x\n\ndef plain(x):\n    return x\n"
    )
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    yield importlib.import_module("unitwork")
    sys.modules.pop("unitwork", None)


def test_a_decorated_function_of_the_project_travels_by_reference(project_module: ModuleType) -> None:
    double = project_module.double
    assert isinstance(double, RemoteFunction)
    assert cloudpickle.loads(double._pickled_function()) == (REFERENCE, "unitwork", "double")
    # The worker resolves it by importing the module, and unwraps the decorator.
    status, payload = run_call(cloudpickle, cloudpickle.dumps((double._pickled_function(), (21,), {})), {})
    assert (status, cloudpickle.loads(payload)) == (OK, 42)


def test_other_functions_are_left_to_cloudpickle_lambdas_by_value(project_module: ModuleType, tmp_path: Path) -> None:
    by_value = rawvm.function(lambda x: x + 1)
    status, payload = run_call(cloudpickle, cloudpickle.dumps((by_value._pickled_function(), (1,), {})), {})
    assert (status, cloudpickle.loads(payload)) == (OK, 2)
    elsewhere = RemoteFunction(project_module.plain, by_value.options, tmp_path / "other-project")
    assert cloudpickle.loads(elsewhere._pickled_function()) is project_module.plain  # cloudpickle's own choice


def test_a_worker_reports_an_exception_with_its_traceback_even_when_it_does_not_pickle() -> None:
    class Local(Exception):  # a local class: pickles by value with cloudpickle; make one that cannot
        def __reduce__(self) -> tuple[object, ...]:
            raise TypeError("no pickling")

    def fails() -> None:
        raise Local("boom")

    status, payload = run_call(cloudpickle, cloudpickle.dumps((cloudpickle.dumps(fails), (), {})), {})
    assert status == ERROR
    ok, exc = decode_result(cloudpickle.loads, status, payload)
    assert not ok and isinstance(exc, RemoteError) and "Local: boom" in str(exc)
    assert isinstance(exc.__cause__, RemoteTraceback) and ", in fails" in exc.__cause__.text


def test_decode_result() -> None:
    assert decode_result(cloudpickle.loads, OK, cloudpickle.dumps([1, 2])) == (True, [1, 2])
    ok, exc = decode_result(cloudpickle.loads, ERROR, cloudpickle.dumps((KeyError("k"), "builtins.KeyError", "", "tb")))
    assert not ok and isinstance(exc, KeyError) and str(exc.__cause__).strip().strip('"').strip() == "tb"
    ok, exc = decode_result(cloudpickle.loads, LOST, b"the worker died")
    assert not ok and isinstance(exc, RemoteError) and str(exc) == "the worker died"


@given(st.lists(st.tuples(st.integers(0, 2**64 - 1), st.integers(0, 255), st.binary(max_size=64)), max_size=20))
def test_frames_round_trip(frames: list[tuple[int, int, bytes]]) -> None:
    assert unpack(pack(frames)) == frames


def test_truncated_frames_are_refused() -> None:
    data = pack([(1, 0, b"hello")])
    for cut in (3, len(data) - 1):
        with pytest.raises(FrameError):
            unpack(data[:cut])


def test_extra_requirements_are_added_only_when_the_environment_lacks_them() -> None:
    platform = SourcePlatform(python="3.11.7", platform="linux_x86_64")
    env = Environment(
        origin="test", kind="environment", platform=platform, distributions=(Distribution("cloudpickle", "2.2.1"),)
    )
    plan = Plan(requirements={"cloudpickle": "cloudpickle==2.2.1"})
    add_extra_requirements(plan, env, [("cloudpickle==3.1.3", "why"), ("Humanize>=4", "asked for")])
    assert plan.requirements == {"cloudpickle": "cloudpickle==2.2.1", "humanize": "Humanize>=4"}
    assert plan.rows["humanize"].action == "added" and plan.rows["humanize"].reason == "asked for"
    assert "cloudpickle" not in plan.rows  # the environment keeps its own version
    with pytest.raises(Exception, match="not a requirement"):
        add_extra_requirements(plan, env, [("not a requirement!", "why")])


def test_on_a_machine_the_decorator_leaves_the_function_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    def f(x: int) -> int:
        return x

    monkeypatch.setenv("RAWVM_CALLS_WORKER", "w1")  # what the agent sets for its call workers
    assert rawvm.function(f) is f
    assert rawvm.function(source="/only/on/the/laptop/.venv", n=4)(f) is f


def test_only_builtin_scalars_skip_cloudpickle() -> None:
    from rawvm.functions.remote import plain

    assert plain((1, "a", b"b", 2.5, None)) and plain({"k": 1}) and plain(())
    assert not plain((lambda: 1,)) and not plain(([1],)) and not plain((object(),)) and not plain({1: 2})


REMOTE_JOB = """\
def helper(x):
    return 10 // x


def job(x):
    y = x - 1
    return helper(y)
"""


def test_a_function_sent_by_value_fails_with_its_file_and_source_lines(tmp_path: Path) -> None:
    """As ``__main__`` or a notebook sends it: cloudpickle alone would say ``File "<dynamic-code>", line 6``."""
    source = tmp_path / "myjob.py"
    source.write_text(REMOTE_JOB)
    namespace: dict[str, Any] = {"__name__": "__main__"}
    exec(compile(REMOTE_JOB, str(source), "exec"), namespace)  # a script's functions, as python myjob.py has them
    blob = RemoteFunction(namespace["job"], rawvm.function(lambda x: x).options, tmp_path)._pickled_function()
    source.unlink()  # the machine has no such file: the text must travel with the call
    # The worker is another process, where the laptop's file is unknown: a fresh interpreter runs the call.
    worker = textwrap.dedent(
        """
        import sys, cloudpickle
        from rawvm_agent.call_worker import run_call
        status, payload = run_call(cloudpickle, cloudpickle.dumps((sys.stdin.buffer.read(), (1,), {})), {})
        print(cloudpickle.loads(payload)[3])
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", worker], input=blob, capture_output=True, cwd=tmp_path.parent, check=True, timeout=60
    )
    text = done.stdout.decode()
    assert "<dynamic-code>" not in text
    assert f'File "{source}", line 7, in job\n    return helper(y)' in text
    assert f'File "{source}", line 2, in helper\n    return 10 // x' in text
    assert "ZeroDivisionError" in text
