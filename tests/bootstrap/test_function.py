"""``@rawvm.function`` on the local provider: real machines (agent processes), real uv installs from PyPI, real
call workers in the locked environment.

The project is a temporary directory with a requirements.txt (``six`` only: no cloudpickle, no humanize) and a
module whose functions are decorated; its functions with the same options share one cluster of 3 machines.
"""

from __future__ import annotations

import concurrent.futures
import importlib
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import rawvm
from rawvm import api, clusters
from rawvm.agent import client as agent_client
from rawvm.functions import pool as function_pool
from rawvm.session import provider_of, run_sync

from tests.helpers.local import local_project, processes_under

pytestmark = [pytest.mark.network, pytest.mark.slow]

WORK = """\
import os

import rawvm
from fnhelpers import double

OPTIONS = dict(n=3, keepalive="60s", source="requirements.txt")


@rawvm.function(**OPTIONS)
def square(x):
    return double(x) * x // 2


@rawvm.function(**OPTIONS)
def where(x):
    return os.getcwd()


@rawvm.function(**OPTIONS)
def fails_on_threes(x):
    if x % 10 == 3:
        raise ValueError(f"unlucky {x}")
    return x


@rawvm.function(**OPTIONS)
def crash(code):
    os._exit(code)


@rawvm.function(n=1, keepalive="2s", source="requirements.txt")
def brief(x):
    return -x


@rawvm.function(n=1, keepalive="60s", source="requirements.txt", packages=["humanize"])
def intcomma(x):
    import humanize

    return humanize.intcomma(x)
"""


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ModuleType]:
    files = {"requirements.txt": "six\n", "fnhelpers.py": "def double(x):\n    return 2 * x\n", "fnwork.py": WORK}
    root, tmp, env = local_project(tmp_path_factory.mktemp("function"), files)
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)
        mp.setenv("RAWVM_STATE_DIR", env["RAWVM_STATE_DIR"])
        mp.setattr(tempfile, "tempdir", str(tmp))
        mp.syspath_prepend(str(root))
        module = importlib.import_module("fnwork")
        try:
            yield module
        finally:
            for record in clusters.all_records():
                api.down(record.name)
            sys.modules.pop("fnwork", None)
            sys.modules.pop("fnhelpers", None)
            deadline = time.monotonic() + 60
            while processes_under(tmp) and time.monotonic() < deadline:
                time.sleep(0.2)
            assert processes_under(tmp) == []


def _agent_status(cluster: str) -> list[dict[str, Any]]:
    import aiohttp

    record = clusters.load(cluster)

    async def statuses() -> list[dict[str, Any]]:
        async with aiohttp.ClientSession() as session:
            out = []
            for machine in record.machines:
                client = agent_client.AgentClient.for_cluster(record, machine.agent_url, session=session)
                out.append(await client.status())
            return out

    return run_sync(statuses())


def test_map_returns_results_in_order_spread_over_three_machines(work: ModuleType) -> None:
    assert work.square.map(range(100)) == [i * i for i in range(100)]
    record = clusters.load(work.square.cluster)
    assert len(record.machines) == 3
    # Each local machine has its own work dir: 300 calls reached all three.
    dirs = set(work.where.map(range(300)))
    assert dirs == {str(Path(m.details["dir"]) / "state" / "work") for m in record.machines}
    assert work.where.cluster == work.square.cluster  # same environment and options: same machines


def test_a_remote_exception_is_raised_here_with_its_type_and_the_remote_frame(work: ModuleType) -> None:
    with pytest.raises(ValueError, match="unlucky 3") as caught:
        work.fails_on_threes.map(range(20))
    remote = caught.value.__cause__
    assert isinstance(remote, rawvm.RemoteTraceback)
    line = WORK.splitlines().index('        raise ValueError(f"unlucky {x}")') + 1
    assert f'fnwork.py", line {line}, in fails_on_threes' in remote.text
    assert 'raise ValueError(f"unlucky {x}")' in remote.text  # the module imported from the bundle's code
    assert work.fails_on_threes.map(range(20), errors="skip") == [x for x in range(20) if x % 10 != 3]


def test_a_big_map_of_tiny_calls_goes_in_chunks_and_keeps_order_and_each_error(work: ModuleType) -> None:
    expected = [x for x in range(5000) if x % 10 != 3]
    assert work.fails_on_threes.map(range(5000), errors="skip") == expected  # probes, then chunks
    sizer = work.fails_on_threes._sizer
    assert sizer.per_call_s is not None and sizer.size(5000, 3) > 100  # measured tiny: many calls a payload
    assert work.fails_on_threes.map(range(5000), errors="skip") == expected  # big chunks from the start
    with pytest.raises(ValueError, match="unlucky 3"):  # the first failure in input order, as itself
        work.fails_on_threes.map(range(5000))


def test_submit_returns_a_future(work: ModuleType) -> None:
    futures = [work.square.submit(x) for x in (3, 4, 5)]
    assert all(isinstance(f, concurrent.futures.Future) for f in futures)
    assert [f.result(timeout=60) for f in futures] == [9, 16, 25]
    failed = work.fails_on_threes.submit(13)
    assert isinstance(failed.exception(timeout=60), ValueError)


def test_a_second_call_within_keepalive_reuses_the_machines(work: ModuleType) -> None:
    work.square(2)
    cluster = work.square.cluster
    before = {s["machine_id"]: s["started_at"] for s in _agent_status(cluster)}
    time.sleep(function_pool.RECHECK_AFTER_S + 0.5)  # long enough that the pool asks the machines again
    assert work.square(6) == 36
    assert work.square.launches == 1
    assert [r.name for r in clusters.all_records() if r.name == cluster] == [cluster]
    assert {s["machine_id"]: s["started_at"] for s in _agent_status(cluster)} == before  # no new agent
    # A new process (here: a fresh function with an empty pool table) finds the warm cluster through the
    # state dir: no lock, no launch.
    saved = dict(function_pool.POOLS)
    function_pool.POOLS.clear()
    try:
        again = rawvm.function(n=3, keepalive="60s", source="requirements.txt")(work.square.fn)
        assert again.map([7, 8]) == [49, 64]
        assert again.cluster == cluster and again.launches == 0
    finally:
        function_pool.POOLS.clear()
        function_pool.POOLS.update(saved)


async def test_a_call_from_inside_a_running_event_loop(work: ModuleType) -> None:
    # As in Jupyter: this thread already runs a loop; the calls run on rawvm's own loop thread.
    assert work.square(9) == 81
    assert work.square.map([1, 2]) == [1, 4]


def test_a_dead_worker_fails_only_its_call_and_is_replaced(work: ModuleType) -> None:
    with pytest.raises(rawvm.RemoteError, match="exit code 3"):
        work.crash(3)
    assert work.square.map(range(30)) == [i * i for i in range(30)]


def test_a_package_the_base_environment_lacks(work: ModuleType, capfd: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(ImportError):
        importlib.import_module("humanize")  # not here, and not in requirements.txt
    assert work.intcomma(1234567) == "1,234,567"
    said = capfd.readouterr().err
    assert "lock: added humanize" in said and "asked for by @rawvm.function(packages=...)" in said
    assert "lock: added cloudpickle" in said  # the environment lacked it: the lock report says it was added
    # Its machines stop (as after the keepalive); the next call launches again, without a new lock.
    first = work.intcomma.cluster
    work.intcomma.down()
    assert work.intcomma(1000) == "1,000"
    said = capfd.readouterr().err
    assert work.intcomma.cluster != first
    assert "lock: the environment is unchanged, using its bundle" in said and "resolving" not in said
    assert work.intcomma.cluster != work.square.cluster  # other packages: another environment, other machines


def test_idle_workers_do_not_keep_a_machine_alive_after_the_keepalive(work: ModuleType) -> None:
    assert work.brief.map(range(5)) == [0, -1, -2, -3, -4]
    record = clusters.load(work.brief.cluster)
    (machine,) = record.machines
    directory = Path(machine.details["dir"])
    deadline = time.monotonic() + 60
    while (directory.exists() or processes_under(directory)) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not directory.exists() and processes_under(directory) == []  # powered off by itself: nothing left
    assert not provider_of(record).alive(machine)
