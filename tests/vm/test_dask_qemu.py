"""A 1-machine Dask cluster on a real VM: ``rawvm.dask_cluster(provider="qemu")`` boots the EC2 user-data, the
agent installs ``distributed`` from PyPI in the guest, starts the scheduler and a worker as tasks, and a client
on the host computes through the forwarded, TLS-only scheduler port."""

from __future__ import annotations

import time
from pathlib import Path

import cloudpickle
import distributed
import psutil
import pytest
import rawvm
from distributed import Client
from rawvm.providers.qemu import QemuProvider
from rawvm_images.local_vm import LocalImage

from tests.vm.helpers import host_extra_ca_certs

pytestmark = [pytest.mark.vm, pytest.mark.network, pytest.mark.slow]


def test_one_machine_dask_cluster_on_a_real_vm_answers_the_host(
    vm_image: LocalImage, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    state = tmp_path / "state"
    monkeypatch.setenv("RAWVM_STATE_DIR", str(state))
    project = tmp_path / "project"
    project.mkdir()
    monkeypatch.chdir(project)
    # the guest's Dask must speak to this host's: the same distributed and cloudpickle (the lambda goes by value)
    (project / "requirements.txt").write_text(
        f"distributed=={distributed.__version__}\ncloudpickle=={cloudpickle.__version__}\n"
    )
    provider = QemuProvider(state)
    started = time.monotonic()
    cluster = rawvm.dask_cluster(
        1,
        provider="qemu",
        dedicated_scheduler=False,
        keepalive="10m",
        source="requirements.txt",
        extra_ca_certs=host_extra_ca_certs(),
    )
    try:
        ready = time.monotonic()
        (machine,) = provider.list()
        assert cluster.scheduler_address.startswith("tls://127.0.0.1:")
        assert cluster.scheduler_address != f"tls://127.0.0.1:{8786}"  # a forwarded host port, not the guest's
        with Client(cluster) as client:
            assert client.submit(lambda: 1 + 1).result(timeout=120) == 2
            ((address, worker),) = client.scheduler_info()["workers"].items()
            assert worker["name"] == "w0"
            assert client.run(lambda: __import__("sys").prefix)[address].endswith("/env")  # the guest's venv
    finally:
        cluster.close()
    pid = int(machine.details["pid"])
    deadline = time.monotonic() + 60
    while psutil.pid_exists(pid) and time.monotonic() < deadline:
        time.sleep(1)
    assert not psutil.pid_exists(pid), "close() stops the VM now"
    assert [m for m in provider.list() if m.state == "running"] == []
    print(f"[timing] dask cluster on qemu ready {ready - started:.1f}s")
