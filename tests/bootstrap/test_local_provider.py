"""The local provider for real: agent processes on loopback, started detached, stopping by themselves.

These use an empty bundle (the agent's own Python), so no package index is needed.
"""

from __future__ import annotations

import asyncio
import dataclasses
import io
import signal
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
from rawvm import clusters
from rawvm.agent.client import AgentClient, AgentError
from rawvm.options import MachineRequest
from rawvm.providers.base import Machine, MachineSpec
from rawvm.providers.local import LocalProvider, host_target, machine_environment
from rawvm_agent.config import AgentConfig, IdleConfig, load_config

from tests.helpers.local import processes_under

pytestmark = pytest.mark.slow


def wait_gone(machine_dir: Path, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not processes_under(machine_dir) and not machine_dir.exists():
            return
        time.sleep(0.2)
    raise AssertionError(f"still there after {timeout}s: {processes_under(machine_dir)}, dir {machine_dir.exists()}")


@pytest.fixture
def provider(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[LocalProvider]:
    monkeypatch.setenv("RAWVM_STATE_DIR", str(tmp_path / "state"))
    local = LocalProvider(root=tmp_path / "local")
    yield local
    for cluster in list((tmp_path / "local").glob("*")):  # whatever a failing test left running
        local.down(cluster.name)


def spec(cluster: str, keepalive: float, count: int = 1) -> MachineSpec:
    agent = AgentConfig(cluster=cluster, token="t" * 43, idle=IdleConfig(keepalive=keepalive))
    channel = clusters.new_channel(cluster, 3600)  # the laptop's half beside the (test) record, as a launch does
    request = MachineRequest(n=count)
    return MachineSpec(cluster=cluster, request=request, agent=agent, agent_wheel=Path("unused.whl"), channel=channel)


def record_of(machine: Machine, token: str = "t" * 43) -> clusters.ClusterRecord:
    return clusters.ClusterRecord(name=machine.cluster, provider="local", token=token, machines=[machine])


async def wait_ready(machine: Machine, timeout: float = 60.0) -> AgentClient:
    client = AgentClient.for_cluster(record_of(machine), machine.agent_url)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if await client.healthz():
            status = await client.status()
            if status["phase"] in {"ready", "idle", "busy"}:
                return client
        await asyncio.sleep(0.2)
    raise AssertionError("agent not ready")


def test_host_target_describes_this_machine() -> None:
    target = host_target()
    assert target.platform in {"linux-x86_64", "linux-aarch64"}
    assert target.python == f"{sys.version_info.major}.{sys.version_info.minor}"
    assert target.glibc.count(".") == 1


def test_the_machine_environment_passes_settings_not_credentials() -> None:
    env = machine_environment(
        {
            "PATH": "/bin",
            "SSL_CERT_FILE": "/ca.pem",
            "UV_INDEX_URL": "https://idx",
            "LC_ALL": "C.UTF-8",
            "https_proxy": "http://p:3128",
            "AWS_SECRET_ACCESS_KEY": "s",
            "GITHUB_TOKEN": "t",
            "VIRTUAL_ENV": "/work/.venv",
            "PYTHONPATH": "/x",
        }
    )
    assert env == {
        "PATH": "/bin",
        "SSL_CERT_FILE": "/ca.pem",
        "UV_INDEX_URL": "https://idx",
        "LC_ALL": "C.UTF-8",
        "https_proxy": "http://p:3128",
    }


async def test_a_task_runs_and_the_machine_stops_by_itself(
    provider: LocalProvider, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "do-not-pass")
    (machine,) = provider.launch(spec("c1", keepalive=2))
    machine_dir = Path(machine.details["dir"])
    config = load_config(machine_dir / "agent.toml")
    assert config.bind == "127.0.0.1" and config.idle.poweroff_command == ()
    assert (machine_dir / "agent.toml").stat().st_mode & 0o777 == 0o600  # it holds the token
    client = await wait_ready(machine)
    try:
        code = "import os, sys; print('out', 'AWS_SECRET_ACCESS_KEY' in os.environ); sys.exit(4)"
        task = await client.submit(["python", "-c", code])
        record = await asyncio.wait_for(client.wait_task(task), 60)
        data, _ = await client.logs(task)
    finally:
        await client.close()
    assert record["exit_code"] == 4
    assert data == b"out False\n"
    async with AgentClient.for_cluster(record_of(machine, "wrong-token"), machine.agent_url) as stranger:
        with pytest.raises(AgentError, match="refused the token"):
            await stranger.status()
    assert [m.state for m in provider.list("c1")] == ["running"]
    wait_gone(machine_dir)  # keepalive 2s of idleness, then the agent exits and the wrapper cleans up
    assert not (machine_dir.parent).exists()  # the last machine takes the staged files with it
    assert provider.list("c1") == []


async def test_down_ends_the_whole_process_tree(provider: LocalProvider, tmp_path: Path) -> None:
    machines = provider.launch(spec("c2", keepalive=600, count=2))
    client = await wait_ready(machines[0])
    await wait_ready(machines[1])
    marker = tmp_path / "grandchild.pid"
    # a task that leaves a detached grandchild in its own session: the subreaper still ends it
    script = (
        "import subprocess; p = subprocess.Popen(['sleep', '300'], start_new_session=True, "
        f"stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL); "
        f"open({str(marker)!r}, 'w').write(str(p.pid))"
    )
    try:
        task = await client.submit(["python", "-c", script])
        await asyncio.wait_for(client.wait_task(task), 60)
    finally:
        await client.close()
    grandchild = psutil.Process(int(marker.read_text()))
    assert grandchild.is_running()
    assert provider.down("c2") == 2
    for machine in machines:
        wait_gone(Path(machine.details["dir"]), timeout=30)
    with pytest.raises(psutil.NoSuchProcess):
        grandchild.status()


async def test_the_agent_is_not_orphaned_when_its_wrapper_dies(provider: LocalProvider) -> None:
    (machine,) = provider.launch(spec("c3", keepalive=600))
    client = await wait_ready(machine)
    await client.close()
    wrapper = psutil.Process(int(machine.details["pid"]))
    (agent,) = wrapper.children()
    wrapper.send_signal(signal.SIGKILL)
    agent.wait(timeout=30)  # PR_SET_PDEATHSIG: the agent leaves with its wrapper
    assert not agent.is_running()
    assert not provider.alive(machine)


async def test_a_failed_install_is_one_clear_error_and_the_machine_still_stops(
    provider: LocalProvider, tmp_path: Path
) -> None:
    """A bundle file whose sha256 does not match: the agent refuses it, the front door says so, and the machine
    still stops after its keepalive."""
    import aiohttp
    from rawvm.errors import RawvmError
    from rawvm.progress import PlainProgress
    from rawvm.session import wait_ready as wait_all_ready
    from rawvm_agent.config import BundleConfig, BundleFile

    manifest = tmp_path / "rawvm-env.toml"
    manifest.write_text("format = 1\n")
    (url,) = provider.stage("c4", [("rawvm-env.toml", manifest)]).values()
    bundle = BundleConfig(files=(BundleFile("rawvm-env.toml", url, "0" * 64),), manifest_sha256="0" * 64)
    base = spec("c4", keepalive=2)
    (machine,) = provider.launch(dataclasses.replace(base, agent=dataclasses.replace(base.agent, bundle=bundle)))
    record = clusters.ClusterRecord(name="c4", provider="local", token="t" * 43, machines=[machine])
    progress = io.StringIO()
    async with aiohttp.ClientSession() as http:
        clients = {"m0": AgentClient.for_cluster(record, machine.agent_url, session=http)}
        with pytest.raises(RawvmError, match=r"machine m0 of c4 is failed: .*sha256"):
            await asyncio.wait_for(wait_all_ready(clients, provider, record, PlainProgress(progress)), 60)
    assert "rawvm: m0 failed" in progress.getvalue()
    wait_gone(Path(machine.details["dir"]))
