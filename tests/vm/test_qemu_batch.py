"""A small batch array on a real VM under qemu, through the real CLI: one VM boots the EC2 user-data, its agent
fetches the staged batch spec (sha256-checked), installs the locked environment from PyPI, runs tasks 0-3 with
their own ids, and powers itself off; ``rawvm batch status`` and ``logs`` then answer from the sink alone.

One VM boot (a few minutes under TCG on two cores)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from rawvm.providers.qemu import QemuProvider
from rawvm_images.local_vm import LocalImage
from rawvm_images.qemu_boot import process_alive

from tests.vm.helpers import host_extra_ca_certs, tail, wait_for

pytestmark = [pytest.mark.vm, pytest.mark.slow, pytest.mark.network]

BOOT_TIMEOUT = 600.0
POWEROFF_TIMEOUT = 600.0  # the idle clock in a TCG guest on a loaded host: a machine still busy when CPU spikes
TASK = ["python", "-c", "import os, tomli_w; print(tomli_w.dumps({'task': int(os.environ['RAWVM_TASK_ID'])}), end='')"]


def test_a_batch_array_runs_on_a_real_vm_and_answers_from_the_sink_after_power_off(
    vm_image: LocalImage, tmp_path: Path
) -> None:
    state = tmp_path / "state"
    env = {**os.environ, "RAWVM_STATE_DIR": str(state)}
    project = tmp_path / "project"
    project.mkdir()
    (project / "requirements.txt").write_text("tomli-w==1.2.0\n")
    ca_flags = [arg for cert in host_extra_ca_certs() for arg in ("--extra-ca-cert", str(cert))]
    rawvm = [sys.executable, "-m", "rawvm.cli"]
    command = [*rawvm, "batch", "run", "--provider", "qemu", "--array", "0-3", "--tasks-per-machine", "2"]
    command += ["--keepalive", "20s", "--from", "requirements.txt", *ca_flags, "--", *TASK]
    provider = QemuProvider(state)
    started = time.monotonic()
    try:
        result = subprocess.run(command, cwd=project, env=env, capture_output=True, text=True, timeout=BOOT_TIMEOUT)
        print(f"\n--- rawvm batch run stderr ---\n{result.stderr}")
        (machine,) = provider.list()
        serial = Path(machine.details["serial_log"])
        assert result.returncode == 0, f"{result.stderr}\n--- serial console (tail) ---\n{tail(serial)}"
        assert "batch done 4 running 0 failed 0 queued 0" in result.stderr
        cluster = result.stdout.strip()
        pid = int(machine.details["pid"])
        wait_for("qemu to exit by itself", lambda: not process_alive(pid), POWEROFF_TIMEOUT, lambda: tail(serial))
        assert "reboot: Power down" in serial.read_text(errors="replace")

        def rawvm_here(*args: str) -> subprocess.CompletedProcess[str]:
            return subprocess.run([*rawvm, *args], cwd=project, env=env, capture_output=True, text=True, timeout=120)

        body = json.loads(rawvm_here("batch", "status", cluster, "--json").stdout)  # the VM is gone: the sink
        assert body["counts"] == {"done": 4, "failed": 0, "lost": 0, "queued": 0, "running": 0}
        for task in range(4):
            assert rawvm_here("batch", "logs", cluster, str(task)).stdout == f"task = {task}\n"
    finally:
        for cluster_dir in sorted((state / "qemu").glob("*")):
            provider.down(cluster_dir.name)
    print(f"[timing] rawvm batch run on qemu, 4 tasks: {time.monotonic() - started:.1f}s to the end")
