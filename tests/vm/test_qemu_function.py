"""``@rawvm.function`` on a real VM (qemu, booted from the EC2 user-data): the front door locks a small project
for the guest's Python, the guest installs it with cloudpickle added, call workers run in the guest's locked
environment and import the project's module from the bundle's code. One boot; a few minutes under TCG."""

from __future__ import annotations

import importlib
import sys
import time
from pathlib import Path

import pytest
import rawvm
from rawvm import api, clusters
from rawvm_images.local_vm import LocalImage
from rawvm_images.qemu_boot import process_alive

from tests.vm.helpers import host_extra_ca_certs

pytestmark = [pytest.mark.vm, pytest.mark.slow, pytest.mark.network]

MODULE = """\
import platform

import rawvm


def where():
    return platform.node(), platform.python_version()


def cube(x):
    if x == 7:
        raise ArithmeticError(f"no cubes of {x}")
    return x**3
"""


def test_function_calls_run_in_a_real_vm(vm_image: LocalImage, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    project = tmp_path / "project"
    project.mkdir()
    (project / "requirements.txt").write_text("six\n")
    (project / "vmwork.py").write_text(MODULE)
    monkeypatch.chdir(project)
    monkeypatch.setenv("RAWVM_STATE_DIR", str(tmp_path / "state"))
    monkeypatch.syspath_prepend(str(project))
    work = importlib.import_module("vmwork")
    options = {"provider": "qemu", "keepalive": "60s", "source": "requirements.txt"}
    where = rawvm.function(**options, extra_ca_certs=host_extra_ca_certs())(work.where)
    cube = rawvm.function(**options, extra_ca_certs=host_extra_ca_certs())(work.cube)
    try:
        started = time.monotonic()
        node, python = where()
        print(f"first call (boot, install, worker) after {time.monotonic() - started:.0f} s", flush=True)
        assert python.rsplit(".", 1)[0] == vm_image.python and node != __import__("platform").node()
        assert cube.map(range(7)) == [x**3 for x in range(7)]
        assert cube.cluster == where.cluster and cube.launches == where.launches == 1
        with pytest.raises(ArithmeticError, match="no cubes of 7") as caught:
            cube(7)
        assert 'vmwork.py", line 12, in cube' in caught.value.__cause__.text  # type: ignore[union-attr]
        (machine,) = clusters.load(cube.cluster).machines
    finally:
        for record in clusters.all_records():
            api.down(record.name)
        sys.modules.pop("vmwork", None)
    deadline = time.monotonic() + 120
    while process_alive(int(machine.details["pid"])) and time.monotonic() < deadline:
        time.sleep(1)
    assert not process_alive(int(machine.details["pid"]))
