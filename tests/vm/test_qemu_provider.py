"""The qemu provider's host side, without booting a VM: the detached stager (real HTTP on loopback), the
per-machine agent config, and list/down over real processes. A plain ``sleep`` stands in for qemu in list/down
(the provider only needs a pid whose command line names the machine's directory)."""

from __future__ import annotations

import json
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path

import pytest
from rawvm.errors import UsageError
from rawvm.options import MachineRequest
from rawvm.providers.base import Machine, MachineSpec
from rawvm.providers.qemu import GUEST_BIND, QemuProvider
from rawvm_agent.config import AgentConfig
from rawvm_images.qemu_boot import TCG, process_alive

pytestmark = pytest.mark.slow  # starts the detached server process


@pytest.fixture
def provider(tmp_path: Path) -> Iterator[QemuProvider]:
    qemu = QemuProvider(tmp_path / "state")
    yield qemu
    for cluster_dir in sorted((tmp_path / "state" / "qemu").glob("*")):
        qemu.down(cluster_dir.name)


def _on_host(url: str) -> str:
    """The guest reaches the host as 10.0.2.2; from the host itself that is loopback."""
    return url.replace("http://10.0.2.2:", "http://127.0.0.1:")


def _fake_machine(provider: QemuProvider, cluster: str, name: str) -> subprocess.Popen[bytes]:
    directory = provider.cluster_dir(cluster) / "machines" / name
    directory.mkdir(parents=True)
    process = subprocess.Popen(["sh", "-c", "sleep 600", str(directory)], start_new_session=True)
    machine = Machine(
        id=name,
        provider="qemu",
        cluster=cluster,
        agent_url="http://127.0.0.1:1",
        details={"pid": str(process.pid), "directory": str(directory)},
    )
    (directory / "machine.json").write_text(json.dumps(asdict(machine)))
    (directory / "disk.qcow2").write_bytes(b"overlay")
    return process


def test_staged_files_are_served_to_the_guest_address_and_the_sink_receives(
    provider: QemuProvider, tmp_path: Path
) -> None:
    source = tmp_path / "pylock.toml"
    source.write_text("lock-version = '1.0'\n")
    urls = provider.stage("c1", [("bundle/pylock.toml", source)])
    assert urls["bundle/pylock.toml"].startswith("http://10.0.2.2:")
    with urllib.request.urlopen(_on_host(urls["bundle/pylock.toml"]), timeout=10) as response:
        assert response.read() == source.read_bytes()

    sink = provider.sink_url("c1")
    (provider.cluster_dir("c1") / "machines" / "m1").mkdir(parents=True)  # as launch makes it before the VM starts
    request = urllib.request.Request(_on_host(sink) + "m1.tar.gz", data=b"logs", method="PUT")
    with urllib.request.urlopen(request, timeout=10) as response:
        assert response.status == 201
    assert (provider.cluster_dir("c1") / "sink" / "m1.tar.gz").read_bytes() == b"logs"


def test_the_stager_wants_its_capability_and_takes_only_launched_machines_flushes(
    provider: QemuProvider, tmp_path: Path
) -> None:
    source = tmp_path / "node.key"
    source.write_text("secret")
    url = _on_host(provider.stage("c1", [("node.key", source)])["node.key"])
    server = provider.cluster_dir("c1") / "server.json"
    capability = json.loads(server.read_text())["capability"]
    assert f"/{capability}/files/node.key" in url and len(capability) >= 32
    assert server.stat().st_mode & 0o777 == 0o600 and provider.cluster_dir("c1").stat().st_mode & 0o777 == 0o700
    for guessed in (url.replace(f"/{capability}", ""), url.replace(capability, capability[::-1])):
        with pytest.raises(urllib.error.HTTPError) as info:
            urllib.request.urlopen(guessed, timeout=10)
        assert info.value.code == 404 and info.value.read() == b""
    forged = urllib.request.Request(_on_host(provider.sink_url("c1")) + "m9.tar.gz", data=b"forged", method="PUT")
    with pytest.raises(urllib.error.HTTPError) as info:
        urllib.request.urlopen(forged, timeout=10)
    assert info.value.code == 403
    assert not (provider.cluster_dir("c1") / "sink" / "m9.tar.gz").exists()


def test_staging_refuses_names_that_leave_the_directory(provider: QemuProvider, tmp_path: Path) -> None:
    source = tmp_path / "x"
    source.write_text("x")
    with pytest.raises(UsageError, match="unsafe staged name"):
        provider.stage("c1", [("../escape", source)])


def test_machine_config_binds_the_guest_and_gives_each_machine_its_sink(provider: QemuProvider, tmp_path: Path) -> None:
    agent = AgentConfig(cluster="c1", token="t")
    request = MachineRequest(provider="qemu", extra_ca_certs=(tmp_path / "ca.crt",))
    spec = MachineSpec(cluster="c1", request=request, agent=agent, agent_wheel=tmp_path / "w.whl")
    config = provider._machine_config(spec, "c1-abc")
    assert config.bind == GUEST_BIND
    assert config.machine_id == "c1-abc"
    assert config.sink == provider.sink_url("c1") + "c1-abc.tar.gz"
    assert config.install.native_tls  # the CAs go to the system store; uv must read it
    # The front door passes the cluster's sink URL: it still becomes one object per machine.
    same = provider._machine_config(
        MachineSpec("c1", MachineRequest(), AgentConfig(sink=provider.sink_url("c1")), spec.agent_wheel), "m2"
    )
    assert same.sink.endswith("/m2.tar.gz")


def test_only_x86_64_cpu_machines(provider: QemuProvider, tmp_path: Path) -> None:
    spec = MachineSpec(cluster="c1", request=MachineRequest(), agent=AgentConfig(), agent_wheel=tmp_path / "w.whl")
    assert provider.target_platform(spec) == "linux-x86_64"
    with pytest.raises(UsageError, match="x86_64 CPU machines only"):
        provider.target_platform(MachineSpec("c1", MachineRequest(arm=True), AgentConfig(), tmp_path / "w.whl"))


def test_bad_cluster_name_is_one_clear_error(provider: QemuProvider) -> None:
    with pytest.raises(UsageError, match="invalid cluster name"):
        provider.cluster_dir("../etc")


def test_list_and_down_follow_the_real_processes(provider: QemuProvider) -> None:
    provider.sink_url("c1")  # starts the cluster's server
    first = _fake_machine(provider, "c1", "c1-a")
    second = _fake_machine(provider, "c1", "c1-b")
    assert {m.id: m.state for m in provider.list("c1")} == {"c1-a": "running", "c1-b": "running"}

    second.kill()
    second.wait()
    assert {m.id: m.state for m in provider.list()} == {"c1-a": "running", "c1-b": "stopped"}

    server = json.loads((provider.cluster_dir("c1") / "server.json").read_text())
    assert provider.down("c1") == 1
    first.wait(timeout=15)
    assert provider.list("c1") == []
    assert not (provider.cluster_dir("c1") / "machines" / "c1-a" / "disk.qcow2").exists()
    deadline = time.monotonic() + 15
    while process_alive(int(server["pid"])) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not process_alive(int(server["pid"]))


def test_the_server_exits_by_itself_once_the_clusters_vms_are_gone(provider: QemuProvider) -> None:
    provider.sink_url("c2")
    server = json.loads((provider.cluster_dir("c2") / "server.json").read_text())
    vm = _fake_machine(provider, "c2", "c2-a")
    time.sleep(3)
    assert process_alive(int(server["pid"]))  # a VM still runs: its agent will upload to the sink later
    vm.kill()
    vm.wait()
    deadline = time.monotonic() + 20
    while process_alive(int(server["pid"])) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not process_alive(int(server["pid"]))
    assert not (provider.cluster_dir("c2") / "server.json").exists()
    machine_dir = provider.cluster_dir("c2") / "machines" / "c2-a"
    assert not (machine_dir / "disk.qcow2").exists()  # a stopped VM's overlay is released
    assert (machine_dir / "machine.json").exists()  # its record stays for ls/logs


def test_accelerator_from_the_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("RAWVM_QEMU_ACCEL", "tcg")
    assert QemuProvider(tmp_path)._accel() == TCG
    monkeypatch.setenv("RAWVM_QEMU_ACCEL", "hvf")
    with pytest.raises(UsageError, match="auto, kvm or tcg"):
        QemuProvider(tmp_path)._accel()
