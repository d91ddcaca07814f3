"""``rawvm.dask_cluster`` on the local provider with real Dask: a dataframe groupby, scaling, TLS refusals, and
nothing left running after ``close()`` or after the client simply goes away. The pieces (commands, the TLS
archive in the bundle, input checks) are tested on their own first."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tarfile
import tempfile
import textwrap
import time
from pathlib import Path

import pandas as pd
import psutil
import pytest
from distributed import Client, Security
from rawvm import launch as launching
from rawvm.api import dask_cluster
from rawvm.dask.options import check_environment, idle_split
from rawvm.dask.procs import (
    DASHBOARD_PRELOAD,
    TLS_DIR,
    SchedulerPlace,
    scheduler_command,
    tls_archive,
    worker_tasks,
)
from rawvm.dask.tls import TlsFiles, make_cluster_tls
from rawvm.errors import UsageError
from rawvm_agent.install import parse_manifest, sha256_file, unpack_code

PLACE = SchedulerPlace(
    "0.0.0.0", 8786, 8787, "tls://203.0.113.7:8786", "tls://10.0.0.5:8786", "https://203.0.113.7:8787/status", ""
)


# -- the pieces --------------------------------------------------------------------------------------------------


def test_scheduler_listens_with_tls_only_and_closes_when_idle() -> None:
    argv = scheduler_command(PLACE, idle_timeout_s=45)
    assert argv[:3] == ["python", "-m", "distributed.cli.dask_scheduler"]
    assert argv[argv.index("--protocol") + 1] == "tls"
    assert argv[argv.index("--idle-timeout") + 1] == "45s"
    assert argv[argv.index("--tls-key") + 1] == f"{TLS_DIR}/node.key"
    preloads = [argv[i + 1] for i, arg in enumerate(argv) if arg == "--preload"]
    assert preloads == [f"{TLS_DIR}/idle.py", f"{TLS_DIR}/dashboard.py"]


def test_a_cpu_machine_gets_one_worker_with_a_thread_per_core() -> None:
    (task,) = worker_tasks("w3", PLACE, cores=8, gpus=0, dask_cuda=False, fixed_ports=True)
    assert task.argv[3:6] == ["tls://10.0.0.5:8786", "--name", "w3"]  # the scheduler's private address
    assert task.argv[task.argv.index("--nthreads") + 1] == "8"
    assert "--no-dashboard" in task.argv
    assert task.argv[task.argv.index("--worker-port") + 1] == "8800:8899"
    assert task.env["DASK_DISTRIBUTED__COMM__REQUIRE_ENCRYPTION"] == "True"


def test_a_gpu_machine_gets_one_worker_per_gpu_each_seeing_its_own() -> None:
    tasks = worker_tasks("w1", PLACE, cores=16, gpus=4, dask_cuda=False, fixed_ports=True)
    assert [t.name for t in tasks] == ["w1-gpu0", "w1-gpu1", "w1-gpu2", "w1-gpu3"]
    assert [t.env["CUDA_VISIBLE_DEVICES"] for t in tasks] == ["0", "1", "2", "3"]
    assert all(t.argv[t.argv.index("--nthreads") + 1] == "4" for t in tasks)
    assert all(t.argv[t.argv.index("--resources") + 1] == "GPU=1" for t in tasks)
    cuda = worker_tasks("w1", PLACE, cores=16, gpus=2, dask_cuda=True, fixed_ports=False)
    assert [t.argv[:3] for t in cuda] == [["dask", "cuda", "worker"]] * 2
    assert all("--worker-port" not in t.argv for t in cuda)


def test_the_tls_archive_travels_in_the_bundle_under_the_manifests_sha256(tmp_path: Path) -> None:
    """The archive is listed in rawvm-env.toml with its sha256 (the chain the agent verifies), and unpacks with the
    agent's own checked unpack into the work dir, the key 0600."""
    tls = make_cluster_tls("c1", tmp_path / "tls")
    assert tls.node_key.stat().st_mode & 0o777 == 0o600 and tls.client_key.stat().st_mode & 0o777 == 0o600
    archive = tls_archive(tls, tmp_path / "rawvm-dask.tar.gz")
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    (bundle / "rawvm-env.toml").write_text('format = 1\n[target]\npython = "3.11"\n')
    manifest_sha = launching.add_code_files(bundle, [("rawvm-dask.tar.gz", archive)])
    assert manifest_sha == sha256_file(bundle / "rawvm-env.toml")
    (entry,) = parse_manifest((bundle / "rawvm-env.toml").read_text()).files
    assert (entry.path, entry.kind) == ("rawvm-dask.tar.gz", "code")
    assert entry.sha256 == sha256_file(bundle / "rawvm-dask.tar.gz")
    work = tmp_path / "work"
    work.mkdir()
    unpack_code(bundle / "rawvm-dask.tar.gz", work)
    assert (work / TLS_DIR / "node.key").read_bytes() == tls.node_key.read_bytes()
    assert (work / TLS_DIR / "node.key").stat().st_mode & 0o777 == 0o600
    assert "scheduler.idle_since = None" in (work / TLS_DIR / "idle.py").read_text()
    with tarfile.open(archive) as tar:  # the laptop's own key never leaves it
        assert sorted(tar.getnames()) == [
            TLS_DIR,
            *(f"{TLS_DIR}/{n}" for n in ("ca.pem", "dashboard.py", "idle.py", "node.key", "node.pem")),
        ]


def test_an_environment_without_distributed_is_one_clear_line(tmp_path: Path) -> None:
    (tmp_path / "pylock.toml").write_text('lock-version = "1.0"\n[[packages]]\nname = "pandas"\nversion = "2.2.0"\n')
    with pytest.raises(UsageError, match="the environment has no 'distributed'"):
        check_environment(tmp_path)
    (tmp_path / "pylock.toml").write_text(
        '[[packages]]\nname = "distributed"\nversion = "1"\n[[packages]]\nname = "dask-cuda"\nversion = "1"\n'
    )
    assert check_environment(tmp_path) is True


def test_bad_input_is_one_line_before_anything_launches(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RAWVM_STATE_DIR", str(tmp_path / "state"))
    with pytest.raises(UsageError, match="a qemu Dask cluster is one VM"):
        dask_cluster(2, provider="qemu")
    with pytest.raises(UsageError, match="too short for a Dask cluster"):
        dask_cluster(1, keepalive="8s")
    with pytest.raises(UsageError, match="unknown provider"):
        dask_cluster(1, provider="gcp")
    assert not (tmp_path / "state" / "dask").exists()
    assert idle_split(20 * 60) == (19 * 60, 60)  # the agents' grace is at most a minute of the keepalive
    cli = subprocess.run(
        [sys.executable, "-m", "rawvm.cli", "dask", "down", "nosuch"],
        capture_output=True,
        text=True,
        env={**os.environ, "RAWVM_STATE_DIR": str(tmp_path / "state")},
    )
    assert cli.returncode == 2 and cli.stderr.count("\n") == 1 and "no Dask cluster named 'nosuch'" in cli.stderr


# -- real clusters of local machines -----------------------------------------------------------------------------


def leftovers(tmp: Path) -> list[psutil.Process]:
    """Agents, wrappers and Dask processes of the test's local machines (the Dask processes run in a machine's
    work dir; their command line may name only ``python``)."""
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        try:
            if str(tmp) in " ".join(proc.info["cmdline"] or []) or str(tmp) in proc.cwd():
                found.append(proc)
        except psutil.Error:
            continue
    return found


def wait_gone(tmp: Path, seconds: float) -> list[psutil.Process]:
    deadline = time.monotonic() + seconds
    while leftovers(tmp) and time.monotonic() < deadline:
        time.sleep(0.5)
    return leftovers(tmp)


def dashboard_is_https_only(link: str, tls: TlsFiles) -> None:
    """The dashboard answers HTTPS with the cluster's CA to a client with the cluster's certificate, and refuses
    a client without one and plain HTTP."""
    import ssl
    import urllib.request

    health = link.replace("/status", "/health")
    context = ssl.create_default_context(cafile=str(tls.ca))
    context.check_hostname = False  # as Dask itself: the CA is the identity, not a host name
    anonymous = ssl.create_default_context(cafile=str(tls.ca))
    anonymous.check_hostname = False
    context.load_cert_chain(tls.client_cert, tls.client_key)
    with urllib.request.urlopen(health, context=context, timeout=10) as answer:
        assert answer.read() == b"ok"
    with pytest.raises(OSError):  # TLS without the client certificate: the handshake fails
        urllib.request.urlopen(health, context=anonymous, timeout=10).read()
    with pytest.raises(OSError):  # plain HTTP on the same port: the TLS server drops it
        urllib.request.urlopen(health.replace("https://", "http://"), timeout=10).read()


async def test_the_dashboard_preload_requires_the_clusters_client_certificate(tmp_path: Path) -> None:
    """A real Dask scheduler, in process, configured as on a machine (the dashboard's TLS settings, the preload):
    Dask alone would serve the dashboard to any TLS client."""
    import asyncio

    import dask
    from distributed import Scheduler

    tls = make_cluster_tls("c1", tmp_path / "tls")
    preload = tmp_path / "dashboard.py"
    preload.write_text(DASHBOARD_PRELOAD)
    security = Security(
        tls_ca_file=str(tls.ca),
        tls_scheduler_cert=str(tls.node_cert),
        tls_scheduler_key=str(tls.node_key),
        require_encryption=True,
    )
    dashboard = {"ca-file": str(tls.ca), "cert": str(tls.node_cert), "key": str(tls.node_key)}
    with dask.config.set({"distributed.scheduler.dashboard.tls": dashboard}):
        async with Scheduler(
            protocol="tls",
            host="127.0.0.1",
            port=0,
            dashboard_address="127.0.0.1:0",
            security=security,
            preload=[str(preload)],
        ) as scheduler:
            link = f"https://127.0.0.1:{scheduler.http_server.port}/status"
            await asyncio.to_thread(dashboard_is_https_only, link, tls)


def running_machines(cluster: object) -> int:
    from rawvm.providers.local import LocalProvider

    records = cluster.fleet.records  # type: ignore[attr-defined]
    return sum(1 for r in records for m in LocalProvider().list(r.name) if m.state == "running")


@pytest.fixture
def project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    root = tmp_path / "project"
    root.mkdir()
    (tmp_path / "tmp").mkdir()
    monkeypatch.chdir(root)
    monkeypatch.setenv("RAWVM_STATE_DIR", str(tmp_path / "state"))
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))  # gettempdir() caches TMPDIR per process
    return root


def parquet_files(directory: Path, parts: int = 4, rows: int = 5000) -> tuple[list[str], pd.DataFrame]:
    directory.mkdir()
    frames = []
    for part in range(parts):
        frame = pd.DataFrame(
            {"key": [f"k{(i * 7 + part) % 13}" for i in range(rows)], "value": [float(i % 101) for i in range(rows)]}
        )
        frame.to_parquet(directory / f"part-{part}.parquet")
        frames.append(frame)
    return sorted(str(p) for p in directory.glob("*.parquet")), pd.concat(frames, ignore_index=True)


@pytest.mark.network
@pytest.mark.slow
def test_groupby_on_three_machines_scale_to_four_and_close_leaves_nothing(
    project: Path, tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    import dask.dataframe as dd

    files, frame = parquet_files(tmp_path / "data")  # local machines share this host's files
    cluster = dask_cluster(3, keepalive="1m")
    try:
        assert cluster.scheduler_address.startswith("tls://127.0.0.1:")
        assert cluster.dashboard_link.startswith("https://127.0.0.1:")
        dashboard_is_https_only(cluster.dashboard_link, cluster.fleet.tls)
        with Client(cluster) as client:
            client.wait_for_workers(3, timeout=120)
            names = sorted(w["name"] for w in client.scheduler_info()["workers"].values())
            assert names == ["w0", "w1", "w2"]
            result = dd.read_parquet(files).groupby("key")["value"].agg(["sum", "count", "mean"]).compute()
            expected = frame.groupby("key")["value"].agg(["sum", "count", "mean"])
            # the same numbers per key; dask's key index is pyarrow strings, pandas' its own string dtype
            pd.testing.assert_frame_equal(result.sort_index(), expected.sort_index(), check_index_type=False)
            # each worker ran in its own machine's environment, not in this process's
            prefixes = client.run(lambda: sys.prefix)
            assert len(set(prefixes.values())) == 3
            assert all(p.startswith(str(tmp_path / "tmp")) for p in prefixes.values())

            cluster.scale(4)
            client.wait_for_workers(4, timeout=300)
            assert len(client.scheduler_info()["workers"]) == 4
            assert len(cluster.fleet.records) == 2  # the fourth worker came from one more launch
            said = capfd.readouterr().err
            assert said.count("resolving") == 1, said  # locked once, before the event loop: the scale-up reused it
            assert "lock: the environment is unchanged, using its bundle from" in said

            # adaptive, with nothing to do: down to one worker; the retired workers' machines power off by themselves
            cluster.adapt(minimum=1, maximum=4)
            deadline = time.monotonic() + 120
            while len(client.scheduler_info()["workers"]) > 1 and time.monotonic() < deadline:
                time.sleep(0.5)
            assert len(client.scheduler_info()["workers"]) == 1
            deadline = time.monotonic() + 120
            while running_machines(cluster) > 2 and time.monotonic() < deadline:
                time.sleep(0.5)
            assert running_machines(cluster) == 2  # the scheduler's and the one worker's
    finally:
        cluster.close()
    assert wait_gone(tmp_path / "tmp", 60) == []
    assert not (tmp_path / "state" / "dask" / cluster.options.name).exists()  # the cluster's keys are gone


def agent_processes(machine_dir: str) -> list[psutil.Process]:
    """The agent of one local machine (its command line names the machine's agent.toml)."""
    config = str(Path(machine_dir) / "agent.toml")
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        cmdline = proc.info["cmdline"] or []
        if config in cmdline and "rawvm_agent" in cmdline:
            found.append(proc)
    return found


@pytest.mark.network
@pytest.mark.slow
def test_scale_down_retires_a_worker_within_a_minute_and_its_machine_stops(project: Path, tmp_path: Path) -> None:
    """``scale(1)`` on two workers (not ``adapt``: SpecCluster's own scale-down asks the scheduler to retire spec
    names as addresses, which retires nothing) leaves one worker within 60 s, and the retired machine's agent
    is gone within the keepalive; the scheduler's machine and the other worker's stay."""
    cluster = dask_cluster(2, keepalive="20s")
    try:
        with Client(cluster) as client:
            client.wait_for_workers(2, timeout=120)
            machine_dir = {name: w.slot.machine.details["dir"] for name, w in cluster.workers.items()}
            assert sorted(machine_dir) == ["w0", "w1"] and all(agent_processes(d) for d in machine_dir.values())
            w1 = next(a for a, w in client.scheduler_info()["workers"].items() if w["name"] == "w1")
            kept = client.submit(lambda: 42, workers=[w1])  # a result held by the worker that retires
            assert kept.result() == 42
            scaled = time.monotonic()
            cluster.scale(1)
            while len(client.scheduler_info()["workers"]) > 1 and time.monotonic() - scaled < 60:
                time.sleep(0.5)
            retired_in = time.monotonic() - scaled
            workers = client.scheduler_info()["workers"].values()
            assert [w["name"] for w in workers] == ["w0"], f"still {len(workers)} workers after {retired_in:.0f} s"
            assert kept.result() == 42  # its data moved, not lost
            while agent_processes(machine_dir["w1"]) and time.monotonic() - scaled < 60 + 20:
                time.sleep(0.5)
            stopped_in = time.monotonic() - scaled
            assert agent_processes(machine_dir["w1"]) == [], "the retired machine's agent still runs"
            print(
                f"scale(1): one worker after {retired_in:.1f} s, the retired machine stopped after {stopped_in:.1f} s"
            )
            while running_machines(cluster) > 2 and time.monotonic() - scaled < 60 + 20:
                time.sleep(0.5)  # the wrapper ends what the agent left and removes the machine's directory
            assert agent_processes(machine_dir["w0"]) and running_machines(cluster) == 2
            assert client.submit(lambda x: x + 1, 1).result(timeout=60) == 2  # the cluster still computes
    finally:
        cluster.close()
    assert wait_gone(tmp_path / "tmp", 60) == []


LOST_LAPTOP = """
import sys, time
from rawvm.dask.cluster import connect

client = connect(sys.argv[1])
client.wait_for_workers(1, timeout=120)
assert client.submit(lambda: 1 + 1).result() == 2
print("READY", flush=True)
time.sleep(3600)
"""


def cannot_connect(address: str, security: Security | None) -> str:
    """Why a client cannot reach the scheduler; fails the test if it can."""
    try:
        client = Client(address, security=security, timeout=8) if security else Client(address, timeout=8)
    except (OSError, TimeoutError, ValueError, TypeError) as exc:
        return type(exc).__name__
    client.close()
    raise AssertionError(f"a client connected to {address} with {security}")


def rawvm_cli(*args: str, env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "rawvm.cli", *args], env=env, cwd=cwd, capture_output=True, text=True, timeout=600
    )


@pytest.mark.network
@pytest.mark.slow
def test_cli_cluster_refuses_strangers_and_a_lost_client_costs_at_most_the_keepalive(
    project: Path, tmp_path: Path
) -> None:
    """``rawvm dask up`` starts the cluster and exits; a client connects with the saved certificates, computes,
    and is killed without closing anything (a lost laptop). The machines outlive it, then all stop within the
    keepalive; ``rawvm dask down`` afterwards finds nothing running and forgets the cluster."""
    env = {**os.environ, "RAWVM_STATE_DIR": str(tmp_path / "state"), "TMPDIR": str(tmp_path / "tmp")}
    up = rawvm_cli("dask", "up", "-n", "1", "--keepalive", "20s", env=env, cwd=project)
    assert up.returncode == 0, up.stderr
    name = up.stdout.strip()
    assert "connect with: from rawvm.dask.cluster import connect" in up.stderr
    state = tmp_path / "state" / "dask" / name
    assert "PRIVATE KEY" not in up.stdout + up.stderr
    address = json.loads((state / "cluster.json").read_text())["scheduler_address"]
    ca, cert, key = (str(state / "tls" / n) for n in ("ca.pem", "client.pem", "client.key"))

    script = project / "laptop.py"
    script.write_text(textwrap.dedent(LOST_LAPTOP))
    laptop = subprocess.Popen(
        [sys.executable, str(script), name],
        cwd=project,
        env=env,
        stdout=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        assert laptop.stdout is not None
        assert laptop.stdout.readline().startswith("READY"), f"the client failed (exit {laptop.poll()})"
        with Client(address, security=Security(tls_ca_file=ca, tls_client_cert=cert, tls_client_key=key), timeout=30):
            pass  # the cluster's own certificates connect: what follows is refused for its certificates alone
        stranger = make_cluster_tls("stranger", tmp_path / "stranger")
        refusals = {
            "plain tcp": cannot_connect(address.replace("tls://", "tcp://"), None),
            "no client certificate": cannot_connect(address, Security(tls_ca_file=ca, require_encryption=True)),
            "another cluster's certificate": cannot_connect(
                address,
                Security(
                    tls_ca_file=ca,
                    tls_client_cert=str(stranger.client_cert),
                    tls_client_key=str(stranger.client_key),
                    require_encryption=True,
                ),
            ),
        }
        assert all(refusals.values())
    finally:
        os.killpg(laptop.pid, signal.SIGKILL)  # the laptop goes away without closing anything
        laptop.wait()
    assert leftovers(tmp_path / "tmp"), "the machines must outlive the laptop until their keepalive"
    remaining = wait_gone(tmp_path / "tmp", 20 + 40)  # keepalive, plus slack for a loaded 2-core machine
    assert remaining == [], [p.info["cmdline"] for p in remaining]
    down = rawvm_cli("dask", "down", name, env=env, cwd=project)
    assert down.returncode == 0, down.stderr
    assert f"stopped 0 machines of Dask cluster {name}" in down.stderr
    assert not state.exists()


@pytest.mark.network
def test_a_locked_environment_without_distributed_stops_before_any_launch(project: Path, tmp_path: Path) -> None:
    (project / "requirements.txt").write_text("humanize\n")
    with pytest.raises(UsageError, match="the environment has no 'distributed'"):
        dask_cluster(1, source="requirements.txt", name="nodask")
    assert leftovers(tmp_path / "tmp") == []
    assert not (tmp_path / "state" / "dask" / "nodask").exists()  # its keys went with it
    assert not list((tmp_path / "state").glob("clusters/nodask*"))  # nothing was launched, nothing to forget


def test_without_the_dask_extra_every_entry_point_is_one_line(tmp_path: Path) -> None:
    """``distributed`` absent (``sys.modules[name] = None`` makes its import fail as a missing package would)."""
    hide = "import sys; sys.modules['distributed'] = None; "
    env = {**os.environ, "RAWVM_STATE_DIR": str(tmp_path / "state")}
    api_call = subprocess.run(
        [
            sys.executable,
            "-c",
            hide + "import rawvm\ntry:\n rawvm.dask_cluster(1)\nexcept rawvm.UsageError as e: print(e)",
        ],
        capture_output=True,
        text=True,
        env=env,
    )
    assert api_call.stdout == "Dask clusters need the 'dask' extra: pip install 'rawvm[dask]'\n", api_call.stderr
    cli = subprocess.run(
        [sys.executable, "-c", hide + "from rawvm.cli import main; sys.exit(main(['dask', 'up', '-n', '1']))"],
        capture_output=True,
        text=True,
        env=env,
    )
    assert (cli.returncode, cli.stderr) == (
        2,
        "rawvm: Dask clusters need the 'dask' extra: pip install 'rawvm[dask]'\n",
    )


def test_rawvm_dask_cluster_stays_callable_after_its_module_is_imported() -> None:
    """A submodule named like the front door's function would replace it on ``rawvm`` once imported."""
    import rawvm
    import rawvm.dask.cluster

    assert callable(rawvm.dask_cluster)
    assert callable(rawvm.function)
