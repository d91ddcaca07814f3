"""Boot overhead of rawvm on the local qemu VM (a benchmark, not a test).

On the same cached Debian image, side by side:

- bare: cloud-init boots with user-data that only runs ``poweroff``: time to the user-data command, and to
  qemu's exit;
- rawvm: the full user-data (uv from its wheel, the agent's venv and wheel, the systemd units), an empty
  environment bundle (the agent's own Python), then one task ``python -c 'print(...)'``: time to the agent's
  /healthz, to phase ready, to the task's output, then ``POST /v1/shutdown`` to qemu's exit.

The overhead is rawvm's boot → first task output minus the bare boot → user-data command. Run:
``uv run python bench/boot.py`` (one VM at a time; minutes under TCG).
"""

from __future__ import annotations

import json
import re
import secrets
import shutil
import ssl
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

from rawvm.agent.tls import client_context, make_channel
from rawvm.agent.wheel import build_agent_wheel
from rawvm.options import MachineRequest
from rawvm.providers.base import MachineSpec
from rawvm.providers.qemu import QemuProvider
from rawvm_agent.config import AgentConfig, IdleConfig
from rawvm_images.local_vm import LocalImage, ensure_image
from rawvm_images.qemu_boot import BootFiles, choose_accel, prepare_boot, process_alive, qemu_command, start_detached

MARKER = "RAWVM-BENCH-USERDATA-RAN"
BARE_USER_DATA = f"#cloud-config\nruncmd:\n  - [sh, -c, 'echo {MARKER} > /dev/console; poweroff']\n"
TIMEOUT = 900.0
# Serial-console lines (guest uptime stamps) that split rawvm's boot into its steps.
CONSOLE_MARKS = {
    "cloud-init user-data stage": "running 'modules:final'",
    "CA certificates start": "Updating certificates in /etc/ssl/certs",
    "CA certificates done": "Running hooks in /etc/ca-certificates/update.d",
    "uv + agent installed": "Created symlink /etc/systemd/system/multi-user.target.wants/rawvm-agent.service",
    "agent process started": "rawvm-agent 0.1.0 starting",
    "agent API listening": "API listening on",
}
_STAMP = re.compile(r"^\[\s*(\d+\.\d+)\]")


def console_marks(serial_log: Path) -> dict[str, float]:
    """Guest uptime (s) at the first console line holding each mark: where rawvm's boot time goes."""
    found: dict[str, float] = {}
    for line in serial_log.read_text(errors="replace").splitlines():
        stamp = _STAMP.match(line)
        for name, needle in CONSOLE_MARKS.items():
            if stamp and name not in found and needle in line:
                found[name] = float(stamp.group(1))
    return found


def wait(check: Callable[[], bool], what: str, timeout: float = TIMEOUT) -> float:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return time.monotonic()
        time.sleep(0.25)
    raise SystemExit(f"bench: timed out waiting for {what}")


def bare_boot(image: LocalImage, work: Path) -> dict[str, float]:
    files = BootFiles(work / "bare")
    prepare_boot(image, files, BARE_USER_DATA, hostname="bare")
    start = time.monotonic()
    pid = start_detached(qemu_command(image, files, accel=choose_accel()), files)
    ran = wait(lambda: files.serial_log.exists() and MARKER in files.serial_log.read_text(errors="replace"), "bare")
    off = wait(lambda: not process_alive(pid), "bare qemu exit")
    return {"user-data ran": ran - start, "qemu exited": off - start}


def _call(url: str, token: str, method: str = "GET", body: Any = None, tls: ssl.SSLContext | None = None) -> Any:
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data=data, method=method, headers={"Authorization": f"Bearer {token}"})
    if data is not None:
        request.add_header("Content-Type", "application/json")
    with urllib.request.urlopen(request, timeout=10, context=tls) as response:
        raw = response.read()
        return json.loads(raw) if "json" in response.headers.get("Content-Type", "") else raw


def _answers(url: str, tls: ssl.SSLContext) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=5, context=tls) as response:
            return bool(response.status == 200)
    except (urllib.error.URLError, OSError):
        return False


def rawvm_boot(work: Path, extra_ca_certs: tuple[Path, ...]) -> tuple[dict[str, float], dict[str, float]]:
    provider = QemuProvider(work / "state")
    cluster = f"bench-{secrets.token_hex(3)}"
    token = secrets.token_urlsafe(24)
    config = AgentConfig(cluster=cluster, token=token, idle=IdleConfig(keepalive=600.0, max_lifetime=3600.0))
    laptop, server = make_channel(cluster, work / "tls", 3600)
    tls = client_context(laptop)
    spec = MachineSpec(
        cluster=cluster,
        request=MachineRequest(provider="qemu", extra_ca_certs=extra_ca_certs),
        agent=config,
        agent_wheel=build_agent_wheel(work / "wheel"),
        channel=server,
    )
    try:
        start = time.monotonic()
        (machine,) = provider.launch(spec)
        pid, base = int(machine.details["pid"]), machine.agent_url
        healthy = wait(lambda: _answers(f"{base}/healthz", tls), "the agent's /healthz")
        ready = wait(lambda: _call(f"{base}/v1/status", token, tls=tls)["phase"] in ("ready", "idle", "busy"), "ready")
        body = {"argv": ["python", "-c", "print(6 * 7)"], "env": {}}
        task = _call(f"{base}/v1/tasks", token, "POST", body, tls=tls)
        done = wait(lambda: _call(f"{base}/v1/tasks/{task['id']}", token, tls=tls)["state"] != "running", "the task")
        output = _call(f"{base}/v1/tasks/{task['id']}/logs?offset=0", token, tls=tls)
        if output.strip() != b"42":
            raise SystemExit(f"bench: the task printed {output!r}, expected 42")
        asked = time.monotonic()
        _call(f"{base}/v1/shutdown", token, "POST", {}, tls=tls)
        off = wait(lambda: not process_alive(pid), "rawvm qemu exit")
        marks = console_marks(Path(machine.details["serial_log"]))
    finally:
        provider.down(cluster)
    timings = {
        "agent healthy": healthy - start,
        "ready": ready - start,
        "first task done": done - start,
        "shutdown → qemu exited": off - asked,
    }
    return timings, marks


def main() -> None:
    image = ensure_image(progress=lambda msg: print(f"[image] {msg}", flush=True))
    extra_ca_certs = tuple(sorted(Path("/usr/local/share/ca-certificates").glob("*.crt")))
    work = Path(tempfile.mkdtemp(prefix="rawvm-bench-boot-"))
    try:
        bare = bare_boot(image, work)
        rawvm, marks = rawvm_boot(work, extra_ca_certs)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"\nqemu accel: {choose_accel()}, image {image.disk.parent.name}")
    print(f"{'phase':<32}{'bare cloud-init':>16}{'rawvm':>10}")
    print(f"{'boot → user-data ran':<32}{bare['user-data ran']:>15.1f}s{'':>10}")
    print(f"{'boot → qemu exited (poweroff)':<32}{bare['qemu exited']:>15.1f}s{'':>10}")
    for name in ("agent healthy", "ready", "first task done", "shutdown → qemu exited"):
        label = f"boot → {name}" if not name.startswith("shutdown") else name
        print(f"{label:<32}{'':>16}{rawvm[name]:>9.1f}s")
    print("\nrawvm's boot on the guest's clock (serial console, s since kernel start):")
    for name, uptime in marks.items():
        print(f"  {uptime:7.1f}  {name}")
    overhead = rawvm["first task done"] - bare["user-data ran"]
    ratio = rawvm["first task done"] / bare["user-data ran"]
    print(f"\nrawvm overhead (first task done - bare user-data ran): {overhead:.1f}s ({ratio:.2f}x the bare boot)")


if __name__ == "__main__":
    main()
