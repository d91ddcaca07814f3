"""Real VMs under qemu (TCG here, KVM where it is hardware): the EC2 user-data boots the Debian image, cloud-init
installs uv and the agent, the agent installs a small locked environment from PyPI and runs tasks, and the
machine powers itself off — with nothing on the host killing qemu.

Each test boots one VM; they take a few minutes each under TCG on two cores. Boot → ready → first-task times
are printed (``pytest -s`` shows them).
"""

from __future__ import annotations

import asyncio
import secrets
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
from rawvm.agent.tls import ChannelFiles, client_context, make_channel
from rawvm.boot_timings import PHASE_ORDER as BOOT_PHASES
from rawvm.options import MachineRequest
from rawvm.providers.base import Machine, MachineSpec
from rawvm.providers.qemu import QemuProvider
from rawvm_agent.config import AgentConfig, IdleConfig
from rawvm_agent.state import SERVING
from rawvm_images.local_vm import LocalImage
from rawvm_images.qemu_boot import process_alive

from tests import reliability
from tests.helpers.tls import strangers_answered
from tests.vm.helpers import (
    AgentClient,
    bundle_config,
    host_extra_ca_certs,
    make_bundle,
    tail,
    wait_for,
)

pytestmark = [pytest.mark.vm, pytest.mark.slow, pytest.mark.network]

BOOT_TIMEOUT = 600.0  # boot + cloud-init + uv + agent venv + bundle install, emulated, on a shared 2-core host
POWEROFF_TIMEOUT = 300.0
REQUIREMENT = "tomli-w==1.2.0"  # small, pure Python, absent from the guest's own Python
TASK = ["python", "-c", "import tomli_w, sys; print(tomli_w.dumps({'answer': 42}), sys.prefix, end='')"]


@dataclass
class Booted:
    machine: Machine
    client: AgentClient
    serial_log: Path
    started: float
    healthy: float
    ready: float
    laptop: ChannelFiles  # the cluster's CA and client certificate on this host
    token: str

    @property
    def pid(self) -> int:
        return int(self.machine.details["pid"])


def boot_agent(
    provider: QemuProvider, image: LocalImage, agent_wheel: Path, tmp_path: Path, idle: IdleConfig
) -> Booted:
    """Stage a real small bundle, launch one VM with the EC2 user-data, wait until its agent is ready."""
    cluster = f"vmtest-{secrets.token_hex(3)}"
    bundle = make_bundle(tmp_path / "bundle", [REQUIREMENT], python=image.python, glibc=image.glibc)
    files = [(f"bundle/{p.relative_to(bundle).as_posix()}", p) for p in sorted(bundle.rglob("*")) if p.is_file()]
    urls = provider.stage(cluster, files)
    token = secrets.token_urlsafe(24)
    config = AgentConfig(cluster=cluster, token=token, bundle=bundle_config(bundle, urls, "bundle"), idle=idle)
    request = MachineRequest(provider="qemu", extra_ca_certs=host_extra_ca_certs())
    laptop, server = make_channel(cluster, tmp_path / "tls", 3600)
    spec = MachineSpec(cluster=cluster, request=request, agent=config, agent_wheel=agent_wheel, channel=server)
    started = time.monotonic()
    (machine,) = provider.launch(spec)
    serial = Path(machine.details["serial_log"])
    assert machine.agent_url.startswith("https://")
    client = AgentClient(machine.agent_url, token, client_context(laptop))
    pid = int(machine.details["pid"])

    def diagnose() -> str:
        return f"qemu alive: {process_alive(pid)}\n--- serial console (tail) ---\n{tail(serial)}"

    def healthy() -> bool:
        assert process_alive(pid), f"the VM stopped before its agent answered\n{diagnose()}"
        return client.healthy()

    healthy_at = wait_for("the agent's /healthz", healthy, BOOT_TIMEOUT, diagnose)

    def ready() -> bool:
        status = client.status()
        assert status["phase"] != "failed", f"install failed: {status['error']}\n{diagnose()}"
        return status["phase"] in SERVING

    ready_at = wait_for("phase ready", ready, BOOT_TIMEOUT, diagnose)
    return Booted(machine, client, serial, started, healthy_at, ready_at, laptop, token)


def run_task(booted: Booted, argv: list[str], timeout: float = 120.0) -> tuple[dict[str, object], bytes]:
    task_id = booted.client.run_task(argv)
    wait_for(
        f"task {argv}",
        lambda: booted.client.task(task_id)["state"] != "running",
        timeout,
        lambda: tail(booted.serial_log),
    )
    return booted.client.task(task_id), booted.client.logs(task_id)


def wait_for_qemu_exit(booted: Booted, timeout: float = POWEROFF_TIMEOUT) -> float:
    """Waits, never kills: qemu runs with -no-reboot, so only a power-off inside the guest ends it."""
    return wait_for(
        "qemu to exit after the guest powered off",
        lambda: not process_alive(booted.pid),
        timeout,
        lambda: tail(booted.serial_log),
    )


def test_rawvm_run_on_qemu_boots_installs_runs_and_powers_off_when_idle(
    vm_image: LocalImage, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The README's command on a real VM, through the real CLI: ``rawvm run --provider qemu --keepalive 20s
    --from requirements.txt -- python -c '...'`` locks tomli-w for the image's target, boots the EC2 user-data,
    cloud-init installs uv and the agent, the agent installs the lock from PyPI, the task's output comes back
    and its exit code is rawvm's. The power-off then comes from the agent's own idle clock, after the CLI has
    returned: 20 s idle → flush to the sink (the tarball must reach the host) → ``systemctl poweroff`` → qemu
    exits, with nothing on the host killing it.
    """
    state = tmp_path / "state"
    monkeypatch.setenv("RAWVM_STATE_DIR", str(state))
    project = tmp_path / "project"  # the CLI ships the current directory's files as the bundle's code
    project.mkdir()
    requirements = project / "requirements.txt"
    requirements.write_text(REQUIREMENT + "\n")
    ca_flags = [arg for cert in host_extra_ca_certs() for arg in ("--extra-ca-cert", str(cert))]
    rawvm = str(Path(sys.executable).parent / "rawvm")  # the console script of this environment
    command = [rawvm, "run", "--provider", "qemu", "--keepalive", "20s", "--timings", "--from", str(requirements)]
    command += ca_flags
    provider = QemuProvider(state)
    started = time.monotonic()
    try:
        result = subprocess.run(
            [*command, "--", *TASK], cwd=project, capture_output=True, text=True, timeout=BOOT_TIMEOUT + 120
        )
        returned = time.monotonic()
        print(f"\n--- rawvm run stderr ---\n{result.stderr}")
        (machine,) = provider.list()
        serial = Path(machine.details["serial_log"])
        assert result.returncode == 0, f"{result.stderr}\n--- serial console (tail) ---\n{tail(serial)}"
        assert result.stdout.startswith("answer = 42\n"), result.stdout
        assert result.stdout.rstrip().endswith("/env"), f"the task must run in the bundle's venv: {result.stdout}"
        # --timings: the way to the first task, every phase from the kernel's boot on (boot_phases.py)
        (start_up,) = [line for line in result.stderr.splitlines() if " start-up: " in line]
        named = [part.split()[0] for part in start_up.split(" start-up: ", 1)[1].split(" → ")]
        assert named == ["launched", *BOOT_PHASES], start_up

        # rawvm shell on the real VM, in the same boot, within its 20 s keepalive (a shell counts as activity):
        # the machine's /bin/sh over the agent's mutual-TLS websocket, its exit code rawvm shell's
        shell = subprocess.run(
            [rawvm, "shell", machine.cluster, "--", "echo $((6*7)); uname -s; exit 3"],
            cwd=project,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert shell.returncode == 3, f"{shell.stderr}\n--- serial console (tail) ---\n{tail(serial)}"
        assert shell.stdout == "42\nLinux\n", shell.stdout

        pid = int(machine.details["pid"])
        off = wait_for("qemu to exit by itself", lambda: not process_alive(pid), POWEROFF_TIMEOUT, lambda: tail(serial))
        console = serial.read_text(errors="replace")
        assert "reboot: Power down" in console
        assert "Triggering OnFailure=" not in console  # the agent stopped the machine itself, not the dead-man switch
        sink = provider.cluster_dir(machine.cluster) / "sink" / f"{machine.id}.tar.gz"
        assert sink.is_file() and sink.stat().st_size > 0, "the agent flushes logs and telemetry to the sink first"
    finally:
        for cluster_dir in sorted((state / "qemu").glob("*")):
            provider.down(cluster_dir.name)
    print(f"[timing] rawvm run → output and exit {returned - started:.1f}s, → qemu exit {off - started:.1f}s")


@pytest.mark.faults
def test_agent_killed_from_inside_the_vm_still_powers_off(
    qemu_provider: QemuProvider, vm_image: LocalImage, agent_wheel: Path, tmp_path: Path
) -> None:
    """The dead-man switch on a real VM (issue 3 item 7), with a keepalive of 1 h so the agent's idle clock
    cannot be what stops the machine within the test.

    1. Both backstops are armed at boot: ``rawvm-backstop.timer`` is active and logind holds the
       ``shutdown -P +N`` schedule (/run/systemd/shutdown/scheduled). They fire only at max_lifetime + grace
       (70 min here), so this test proves them armed, not fired.
    2. A task SIGKILLs the agent's main pid once: systemd's ``Restart=on-failure`` brings it back (the serial
       console shows the SIGKILL and the scheduled restart) and the agent answers again, still installed.
    3. A task SIGSTOPs the agent (a hang): after WatchdogSec the watchdog aborts it (SIGABRT with SIGCONT) and
       ``Restart=`` brings it back, resumed from its state file — in the same VM, no second boot.
    4. A last task starts a killer outside the agent's cgroup (``systemd-run``) that SIGKILLs every new agent
       process. The restarts exhaust ``StartLimitBurst`` ("Start request repeated too quickly") →
       ``OnFailure=rawvm-poweroff.service`` → ``systemctl poweroff`` → qemu exits. That link — OnFailure, with no
       agent alive to decide anything — is what powers this VM off, and the console log must show it.
    """
    idle = IdleConfig(keepalive=3600.0, max_lifetime=3600.0)
    booted = boot_agent(qemu_provider, vm_image, agent_wheel, tmp_path, idle)
    print(f"\n[timing] boot→ready {booted.ready - booted.started:.1f}s")
    # the channel on a real VM (same boot): only this cluster's client certificate gets an answer
    assert asyncio.run(strangers_answered(booted.machine.agent_url, booted.laptop, tmp_path, booted.token)) == []

    record, stdout = run_task(
        booted, ["sh", "-c", "systemctl is-active rawvm-backstop.timer; cat /run/systemd/shutdown/scheduled"]
    )
    assert record["exit_code"] == 0, (record, stdout)
    assert stdout.startswith(b"active\n") and b"USEC=" in stdout, stdout

    before = booted.client.status()
    booted.client.run_task(["sh", "-c", "kill -9 $(systemctl show -p MainPID --value rawvm-agent.service)"])
    wait_for("the agent to die", lambda: not booted.client.healthy(), 60, lambda: tail(booted.serial_log))
    wait_for("systemd to restart the agent", booted.client.healthy, 300, lambda: tail(booted.serial_log))
    after = booted.client.status()
    assert after["phase"] in SERVING, after  # resumed from its state file, not reinstalled
    assert after["started_at"] == before["started_at"]
    serial = booted.serial_log.read_text(errors="replace")
    assert "rawvm-agent.service: Main process exited, code=killed, status=9/KILL" in serial
    assert "rawvm-agent.service: Scheduled restart job" in serial

    # 3. The agent hangs: SIGSTOP. It stops feeding the watchdog → after WatchdogSec systemd sends SIGABRT (and
    #    SIGCONT, so a stopped process dies of it) → result 'watchdog' → restarted, state and idle clock kept.
    hung_at = time.monotonic()
    booted.client.run_task(["sh", "-c", "kill -STOP $(systemctl show -p MainPID --value rawvm-agent.service)"])
    wait_for("the agent to stop answering", lambda: not booted.client.healthy(), 60, lambda: tail(booted.serial_log))
    wait_for("the watchdog to restart the hung agent", booted.client.healthy, 420, lambda: tail(booted.serial_log))
    print(f"[timing] SIGSTOP → agent answering again {time.monotonic() - hung_at:.1f}s")
    after_hang = booted.client.status()
    assert after_hang["phase"] in SERVING and after_hang["started_at"] == before["started_at"], after_hang
    assert after_hang["restarts"] > after["restarts"]
    serial = booted.serial_log.read_text(errors="replace")
    assert "rawvm-agent.service: Watchdog timeout" in serial, tail(booted.serial_log)
    assert "rawvm-agent.service: Failed with result 'watchdog'." in serial, tail(booted.serial_log)

    # 4. Restarts exhausted: the dead-man switch powers the VM off.
    killer = (
        "while :; do pid=$(systemctl show -p MainPID --value rawvm-agent.service);"
        ' [ "${pid:-0}" -gt 0 ] && kill -9 "$pid"; sleep 0.2; done'
    )
    booted.client.run_task(["systemd-run", "--unit=rawvm-test-killer", "sh", "-c", killer])
    wait_for_qemu_exit(booted, timeout=600)
    serial = booted.serial_log.read_text(errors="replace")
    # systemd 252 keeps the last result ('signal') and says why it gave up in this line.
    assert "rawvm-agent.service: Start request repeated too quickly" in serial, tail(booted.serial_log)
    assert "rawvm-agent.service: Triggering OnFailure= dependencies" in serial
    assert "Starting rawvm-poweroff.service" in serial
    assert "reboot: Power down" in serial
    reliability.survived("agent SIGKILL on a VM")
    reliability.survived("agent hang (SIGSTOP) on a VM")
