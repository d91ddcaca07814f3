"""Gang jobs on local machines (agent processes on this host), through the real CLI: every node knows its rank
and its peers, the nodes reach each other at those addresses (a ring all-reduce over TCP in pure Python, on each
node's own port; and jax.distributed's all-reduce on CPU over gloo), one failing node ends the others' tasks within
seconds while the run exits with its code naming it, and a lost node (its agent killed) does the same."""

from __future__ import annotations

import contextlib
import json
import re
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from tests.helpers.local import local_project, processes_under
from tests.systools import need_index

pytestmark = [pytest.mark.network, pytest.mark.slow]

SHOW = """
import json, os
print(json.dumps({k: os.environ[k] for k in (
    "RAWVM_NODE_RANK", "RAWVM_NUM_NODES", "RAWVM_NODE_IPS", "RAWVM_HEAD_IP", "RAWVM_GPUS_PER_NODE",
    "RAWVM_NODE_PORT", "RAWVM_NODE_PORTS", "MASTER_ADDR", "MASTER_PORT")}))
"""

# Ring all-reduce of (rank + 1) over the peers' addresses: each node listens on its own port and, N-1 times,
# passes the last value it got to the next node while taking one from the previous.
ALLREDUCE = """
import os, socket, time
rank, n = int(os.environ["RAWVM_NODE_RANK"]), int(os.environ["RAWVM_NUM_NODES"])
ips = os.environ["RAWVM_NODE_IPS"].split("\\n")
ports = [int(p) for p in os.environ["RAWVM_NODE_PORTS"].split("\\n")]
server = socket.create_server(("", ports[rank]))
nxt = (rank + 1) % n
deadline = time.time() + 60
while True:
    try:
        out = socket.create_connection((ips[nxt], ports[nxt]), timeout=5)
        break
    except OSError:
        if time.time() > deadline:
            raise
        time.sleep(0.1)
inbound, _ = server.accept()
reader = inbound.makefile("r")
total = carry = rank + 1
for _ in range(n - 1):
    out.sendall(f"{carry}\\n".encode())
    carry = int(reader.readline())
    total += carry
print(f"allreduce sum={total}")
"""

MARKER = "gang-test-sleeper"
FAIL = f"""
import os, sys, time
# {MARKER}
if os.environ["RAWVM_NODE_RANK"] == "1":
    time.sleep(2)
    print("m1 gives up now", flush=True)
    print("failing at", time.time(), flush=True)
    sys.exit(3)
time.sleep(600)
"""


def rawvm(*args: str, env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "rawvm.cli", *args], env=env, cwd=cwd, capture_output=True, text=True, timeout=300
    )


def sleepers() -> list[psutil.Process]:
    found = []
    for p in psutil.process_iter(["cmdline"]):
        if any(MARKER in part for part in p.info["cmdline"] or []):
            found.append(p)
    return found


def test_ranks_peers_allreduce_and_all_or_nothing(tmp_path: Path) -> None:
    need_index()
    project, _tmp, env = local_project(tmp_path, {"requirements.txt": "humanize\n"})
    cluster = f"gang-{int(time.time()) % 100000}"
    base = ("--cluster", cluster)
    try:
        shown = rawvm(
            "run", "-n", "3", "--keepalive", "5m", "--from", "requirements.txt", "--name", cluster,
            "--", "python", "-c", SHOW,
            env=env, cwd=project,
        )  # fmt: skip
        assert shown.returncode == 0, shown.stderr
        by_node = {}
        for line in shown.stdout.splitlines():
            node, text = re.fullmatch(r"\[(m\d)\] (.*)", line).groups()  # type: ignore[union-attr]
            by_node[node] = json.loads(text)
        assert sorted(v["RAWVM_NODE_RANK"] for v in by_node.values()) == ["0", "1", "2"]
        assert {node: v["RAWVM_NODE_RANK"] for node, v in by_node.items()} == {"m0": "0", "m1": "1", "m2": "2"}
        assert len({v["RAWVM_NODE_IPS"] for v in by_node.values()}) == 1
        head = by_node["m0"]
        assert head["RAWVM_NODE_IPS"] == "127.0.0.1\n127.0.0.1\n127.0.0.1"
        ports = head["RAWVM_NODE_PORTS"].split("\n")
        assert len(set(ports)) == 3  # distinct ports on the one shared address
        assert [v["RAWVM_NODE_PORT"] for _, v in sorted(by_node.items())] == ports
        assert {(v["MASTER_ADDR"], v["MASTER_PORT"]) for v in by_node.values()} == {("127.0.0.1", ports[0])}
        assert {v["RAWVM_NUM_NODES"] for v in by_node.values()} == {"3"}
        assert {v["RAWVM_GPUS_PER_NODE"] for v in by_node.values()} == {"0"}

        reduced = rawvm("run", *base, "--", "python", "-c", ALLREDUCE, env=env, cwd=project)
        assert reduced.returncode == 0, reduced.stderr
        assert sorted(reduced.stdout.splitlines()) == [f"[m{i}] allreduce sum=6" for i in range(3)]

        started = time.monotonic()
        failed = rawvm("run", *base, "--", "python", "-c", FAIL, env=env, cwd=project)
        took = time.monotonic() - started
        assert failed.returncode == 3  # the failed node's code, not the cancelled nodes' 143
        assert "node m1 (rank 1) exited with code 3" in failed.stderr
        assert "m1 gives up now" in failed.stderr.split("exited with code 3", 1)[1]  # its last lines
        failed_at = float(re.search(r"failing at ([0-9.]+)", failed.stdout).group(1))  # type: ignore[union-attr]
        while sleepers() and time.time() < failed_at + 15:
            time.sleep(0.1)
        assert sleepers() == [], "a node's task outlived the failed node by 15 s"
        assert took < 60, failed.stderr
        assert json.loads(rawvm("ls", "--json", env=env, cwd=project).stdout)[0]["running"] == 3  # keepalive as usual
    finally:
        rawvm("down", cluster, env=env, cwd=project)


LOST_MARKER = "gang-test-lost"
WAIT = f"""
import os, time
# {LOST_MARKER}
print("node", os.environ["RAWVM_NODE_RANK"], "up", flush=True)
time.sleep(600)
"""


def test_a_lost_node_ends_the_run_and_cancels_the_others(tmp_path: Path) -> None:
    """m1's agent and its wrapper die (a crash, a spot reclaim): the run ends non-zero naming m1 as lost, and
    m0's task is cancelled."""
    need_index()
    project, tmp, env = local_project(tmp_path, {"requirements.txt": "humanize\n"})
    cluster = f"lost-{int(time.time()) % 100000}"
    argv = [sys.executable, "-m", "rawvm.cli", "run", "-n", "2", "--keepalive", "5m", "--from", "requirements.txt"]
    proc = subprocess.Popen(
        [*argv, "--name", cluster, "--", "python", "-c", WAIT],
        cwd=project,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        seen = {proc.stdout.readline().strip() for _ in range(2)}
        assert seen == {"[m0] node 0 up", "[m1] node 1 up"}
        m1_dir = next(tmp.glob(f"rawvm-local-*/{cluster}/m1"))
        for process in processes_under(m1_dir):  # the wrapper and the agent: m1 stops answering
            process.kill()
        _, err = proc.communicate(timeout=90)
        assert proc.returncode == 1, err
        assert "node m1 (rank 1) was lost" in err
        deadline = time.monotonic() + 15
        while rank_zero_tasks() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert rank_zero_tasks() == [], "m0's task outlived the lost node"
    finally:
        proc.kill()
        for process in lost_tasks():  # m1's task outlived its killed agent: it is this test's to end
            process.kill()
        rawvm("down", cluster, env=env, cwd=project)


def lost_tasks() -> list[psutil.Process]:
    return [p for p in psutil.process_iter(["cmdline"]) if any(LOST_MARKER in a for a in p.info["cmdline"] or [])]


def rank_zero_tasks() -> list[psutil.Process]:
    alive = []
    for process in lost_tasks():
        with contextlib.suppress(psutil.Error):
            if process.environ().get("RAWVM_NODE_RANK") == "0" and process.status() != psutil.STATUS_ZOMBIE:
                alive.append(process)
    return alive


JAX_SUM = """
import os

import jax

jax.config.update("jax_cpu_collectives_implementation", "gloo")
rank, n = int(os.environ["RAWVM_NODE_RANK"]), int(os.environ["RAWVM_NUM_NODES"])
jax.distributed.initialize(f"{os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']}", num_processes=n, process_id=rank)

import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

mesh = Mesh(np.array(jax.devices()), ("node",))
local = np.array([float(rank + 1)])
spread = jax.make_array_from_process_local_data(NamedSharding(mesh, PartitionSpec("node")), local)
total = jax.jit(lambda a: a.sum(), out_shardings=NamedSharding(mesh, PartitionSpec()))(spread)  # an all-reduce
print(f"devices={jax.device_count()} sum={float(total)}", flush=True)
"""


def test_jax_distributed_sums_across_two_machines(tmp_path: Path) -> None:
    """A real collective from a real distributed library: jax.distributed on CPU (gloo) across two local machines,
    its coordinator at MASTER_ADDR:MASTER_PORT; each contributes rank + 1, both see 3. (jax and jaxlib are about
    500 MB in each machine's environment, from uv's shared cache after the first.)"""
    need_index()
    project, _tmp, env = local_project(tmp_path, {"requirements.txt": "jax\n", "jax_sum.py": JAX_SUM})
    cluster = f"jax-{int(time.time()) % 100000}"
    try:
        run = rawvm(
            "run", "-n", "2", "--keepalive", "2m", "--from", "requirements.txt", "--name", cluster, "--",
            "python", "jax_sum.py", env=env, cwd=project,
        )  # fmt: skip
        assert run.returncode == 0, run.stderr[-3000:]
        sums = sorted(line for line in run.stdout.splitlines() if "sum=" in line)  # gloo prints lines of its own
        assert sums == ["[m0] devices=2 sum=3.0", "[m1] devices=2 sum=3.0"]
    finally:
        rawvm("down", cluster, env=env, cwd=project)
