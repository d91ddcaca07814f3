"""``rawvm batch`` for real on the local provider: agents on loopback running their shares, retrying, flushing
results to the sink, and stopping by themselves; the CLI run, detached, and with a machine killed mid-batch.

The environment is an empty requirements file (the lock needs no package index)."""

from __future__ import annotations

import contextlib
import json
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest
from rawvm import clusters, session, sinks
from rawvm.batches import array as batches
from rawvm_agent.batch import share_of
from rawvm_agent.batch_results import read_results

from tests.helpers.local import local_project, processes_under

pytestmark = pytest.mark.slow

ARRAY = list(range(50))


def task_code(marker: Path, sleep: float = 0.0) -> str:
    """Prints its id, but task 11 prints nothing; task 7 fails its first run (a marker file says it has run)."""
    return (
        "import os, sys, pathlib, time; i = os.environ['RAWVM_TASK_ID']; "
        "print('task', i, flush=True) if i != '11' else None; "
        f"m = pathlib.Path({str(marker)!r}); first = i == '7' and not m.exists(); "
        f"m.write_text('ran') if first else None; time.sleep({sleep}); sys.exit(3 if first else 0)"
    )


@pytest.fixture
def env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[dict[str, str]]:
    project, tmp, environ = local_project(tmp_path, {"requirements.txt": ""})
    monkeypatch.setenv("RAWVM_STATE_DIR", environ["RAWVM_STATE_DIR"])  # for the in-process reads below
    environ["CWD"] = str(project)
    yield environ
    for proc in processes_under(tmp):  # whatever a failing test left running
        proc.kill()


def rawvm(*args: str, env: dict[str, str], timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "rawvm.cli", *args],
        env=env,
        cwd=env["CWD"],
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def run_array(env: dict[str, str], code: str, *flags: str) -> subprocess.CompletedProcess[str]:
    return rawvm(
        "batch",
        "run",
        "--array",
        "0-49",
        "-n",
        "3",
        "--tasks-per-machine",
        "2",
        "--keepalive",
        "3s",
        "--from",
        "requirements.txt",
        *flags,
        "--",
        "python",
        "-c",
        code,
        env=env,
    )


def wait_no_machines(env: dict[str, str], timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while processes_under(Path(env["TMPDIR"])) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not processes_under(Path(env["TMPDIR"]))


def status_json(env: dict[str, str], cluster: str) -> dict[str, Any]:
    answer = rawvm("batch", "status", cluster, "--json", env=env)
    body: dict[str, Any] = json.loads(answer.stdout)
    return body


def wait_status(env: dict[str, str], cluster: str, ok: Any, timeout: float = 120) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        body = status_json(env, cluster)
        if ok(body["counts"]):
            return body
        assert time.monotonic() < deadline, body["counts"]
        time.sleep(0.5)


def flushed_results(cluster: str) -> dict[str, dict[int, dict[str, Any]]]:
    """Each machine's results as its flushes to the sink hold them."""
    out: dict[str, dict[int, dict[str, Any]]] = {}
    for flush in sinks.sink_dir(cluster).glob(f"{cluster}-*/batch/results"):
        for result in read_results(flush):
            out.setdefault(result["machine"], {})[result["id"]] = result
    return out


def test_an_array_runs_every_id_once_and_retries_the_failure(env: dict[str, str], tmp_path: Path) -> None:
    run = run_array(env, task_code(tmp_path / "marker"))
    assert run.returncode == 0, run.stderr
    cluster = run.stdout.strip()
    assert "batch done 50 running 0 failed 0 queued 0" in run.stderr
    wait_no_machines(env)  # they stop by themselves after the keepalive; what they did is in the sink
    per_machine = flushed_results(cluster)
    assert sorted(per_machine) == ["m0", "m1", "m2"]
    ids = [i for results in per_machine.values() for i in results]
    assert sorted(ids) == ARRAY  # every id, each on exactly one machine
    for index, machine in enumerate(["m0", "m1", "m2"]):
        assert sorted(per_machine[machine]) == sorted(share_of(ARRAY, 3, index))
    results = {i: r for rs in per_machine.values() for i, r in rs.items()}
    assert all(r["state"] == "done" for r in results.values())
    assert [a["exit_code"] for a in results[7]["attempts"]] == [3, 0]
    assert all(len(r["attempts"]) == 1 for i, r in results.items() if i != 7)
    for i in (0, 7, 49):  # each task's own log, read back from the sink
        out = rawvm("batch", "logs", cluster, str(i), env=env)
        assert out.returncode == 0 and out.stdout == f"task {i}\n", out.stderr
    silent = rawvm("batch", "logs", cluster, "11", env=env)  # its machine kept no log files: empty, not missing
    assert (silent.returncode, silent.stdout, silent.stderr) == (0, "", "")
    assert results[11]["attempts"][0]["output_bytes"] == 0 and results[7]["attempts"][1]["output_bytes"] == 7
    assert status_json(env, cluster)["counts"] == {"done": 50, "failed": 0, "lost": 0, "queued": 0, "running": 0}


def test_without_retries_the_failed_task_is_named_and_the_exit_code_is_not_0(
    env: dict[str, str], tmp_path: Path
) -> None:
    run = run_array(env, task_code(tmp_path / "marker"), "--max-retries", "0")
    assert run.returncode == 1
    assert "1 task failed for good: 7" in run.stderr
    cluster = run.stdout.strip()
    body = status_json(env, cluster)
    assert body["counts"]["done"] == 49 and body["counts"]["failed"] == 1 and body["states"]["7"] == "failed"


def test_a_detached_batch_completes_and_its_machines_stop(env: dict[str, str], tmp_path: Path) -> None:
    run = run_array(env, task_code(tmp_path / "marker", sleep=0.2), "--detach")
    assert run.returncode == 0, run.stderr
    cluster = run.stdout.strip()
    assert "detached" in run.stderr
    assert status_json(env, cluster)["counts"]["done"] < 50  # it left right after the launch
    wait_status(env, cluster, lambda c: c["done"] == 50)
    wait_no_machines(env)  # no agent left after the keepalive
    body = status_json(env, cluster)  # from the sink alone now
    assert body["counts"] == {"done": 50, "failed": 0, "lost": 0, "queued": 0, "running": 0}
    assert rawvm("batch", "logs", cluster, "7", env=env).stdout == "task 7\n"


def kill_tree(pid: int) -> None:
    root = psutil.Process(pid)
    for proc in [root, *root.children(recursive=True)]:
        with contextlib.suppress(psutil.NoSuchProcess):  # a task that ended between the listing and the kill
            proc.send_signal(signal.SIGKILL)


def wait_some_results(cluster: str, machine: str, count: int, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while True:
        record = clusters.load(cluster)
        live = session.run_sync(batches.poll_agents(record))
        if machine in live and len(live[machine]["results"]) >= count:
            return
        assert time.monotonic() < deadline, "no results yet"
        time.sleep(0.2)


def test_a_machine_killed_while_detached_leaves_its_tasks_lost_by_id_and_retry_reruns_them(
    env: dict[str, str], tmp_path: Path
) -> None:
    run = run_array(env, task_code(tmp_path / "marker", sleep=0.3), "--detach")
    assert run.returncode == 0, run.stderr
    cluster = run.stdout.strip()
    wait_some_results(cluster, "m1", 2)
    (m1,) = [m for m in clusters.load(cluster).machines if m.id.endswith("-m1")]
    kill_tree(int(m1.details["pid"]))
    body = wait_status(env, cluster, lambda c: c["running"] == 0 and c["queued"] == 0)
    lost = sorted(int(i) for i, s in body["states"].items() if s == "lost")
    assert lost, body["counts"]
    assert set(lost) <= set(share_of(ARRAY, 3, 1))  # only the dead machine's
    assert body["counts"]["done"] == 50 - len(lost)
    text = rawvm("batch", "status", cluster, env=env)
    assert text.returncode == 1 and f"rawvm batch retry {cluster}" in text.stderr
    retried = rawvm("batch", "retry", cluster, env=env)
    assert retried.returncode == 0, retried.stderr
    assert f"retrying {len(lost)} tasks" in retried.stderr
    body = status_json(env, cluster)
    assert body["counts"] == {"done": 50, "failed": 0, "lost": 0, "queued": 0, "running": 0}


def test_a_machine_killed_while_attached_has_its_tasks_run_on_the_others(env: dict[str, str], tmp_path: Path) -> None:
    args = ["batch", "run", "--array", "0-49", "-n", "3", "--tasks-per-machine", "2", "--keepalive", "3s"]
    code = task_code(tmp_path / "marker", sleep=0.3)
    proc = subprocess.Popen(
        [sys.executable, "-m", "rawvm.cli", *args, "--from", "requirements.txt", "--", "python", "-c", code],
        env=env,
        cwd=env["CWD"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 120
        while not (names := [p.stem for p in clusters.clusters_dir().glob("*.json")]):
            assert time.monotonic() < deadline
            time.sleep(0.2)
        (cluster,) = names
        while len(clusters.load(cluster).machines) < 3:
            time.sleep(0.2)
        wait_some_results(cluster, "m1", 2)
        (m1,) = [m for m in clusters.load(cluster).machines if m.id.endswith("-m1")]
        kill_tree(int(m1.details["pid"]))
        out, err = proc.communicate(timeout=180)
    finally:
        proc.kill()
    assert proc.returncode == 0, err
    assert "machine m1 is gone" in err and "run on m0, m2" in err
    assert "batch done 50 running 0 failed 0 queued 0" in err
    body = status_json(env, out.strip())
    assert body["counts"]["done"] == 50


def test_the_python_api_maps_over_values(
    env: dict[str, str], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import tempfile

    import rawvm

    monkeypatch.setattr(tempfile, "tempdir", env["TMPDIR"])  # the local machines live under the test's tmp
    monkeypatch.chdir(env["CWD"])
    code = (
        "import os; print(os.environ['RAWVM_TASK_VALUE'], os.environ['RAWVM_TASK_ID'], os.environ['RAWVM_TASK_COUNT'])"
    )
    result = rawvm.batch(
        ["python", "-c", code],
        map_over_values=["a.parquet", "b.parquet", "c.parquet"],
        n=2,
        source="requirements.txt",
        keepalive="3s",
    )
    assert result.exit_code == 0 and result.states == {0: "done", 1: "done", 2: "done"}
    assert [result.results[i]["value"] for i in range(3)] == ["a.parquet", "b.parquet", "c.parquet"]
    capsys.readouterr()
    for i, value in enumerate(["a.parquet", "b.parquet", "c.parquet"]):
        assert batches.logs(result.cluster, i) == 0
        assert capsys.readouterr().out == f"{value} {i} 3\n"
    wait_no_machines(env)
