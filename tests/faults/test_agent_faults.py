"""Faults around one real agent process (``python -m rawvm_agent`` on loopback, as a VM runs it): each test breaks
something the machine depends on and asserts that the machine still powers off, and what was kept.

"Power off" is the configured ``poweroff_command`` (here: touch a marker file outside the state dir, then the
agent exits 0), exactly the command path a VM takes; the sink is a directory outside the state dir unless the
test is about the sink.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
import shutil
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from http.server import ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from tests import reliability
from tests.agent.core_helpers import agent_config, make_wheel, pylock_for_wheel, write_bundle
from tests.agent.test_agent_process import AgentProcess, FakeImds, serving, start_spot_agent
from tests.helpers.http import QuietHandler, loopback_server
from tests.systools import need_tool

pytestmark = [pytest.mark.faults, pytest.mark.slow]

POWEROFF_WAIT = 120.0  # EC2 gives a spot machine two minutes; every fault here must end well inside that


def flushed(sink: Path) -> dict[str, Path]:
    """The files of the (single) flush in a directory sink, by path relative to the flush."""
    (flush,) = [p for p in sink.iterdir() if p.is_dir()]
    return {p.relative_to(flush).as_posix(): p for p in flush.rglob("*") if p.is_file()}


def powered_off(agent: AgentProcess, marker: Path, timeout: float = POWEROFF_WAIT) -> float:
    """Seconds until the agent ran its power-off command and exited 0."""
    started = time.monotonic()
    assert agent.proc.wait(timeout) == 0, agent.stderr_path.read_text()[-3000:]
    assert marker.exists(), f"the power-off command never ran\n{agent.stderr_path.read_text()[-3000:]}"
    return time.monotonic() - started


# -- the sink is unreachable when the machine flushes -----------------------------------------------------------


class RefusingSink(QuietHandler):
    """A presigned-PUT sink that answers every upload 503 (S3 having a bad minute), counting the attempts."""

    attempts = 0

    def do_PUT(self) -> None:
        RefusingSink.attempts += 1
        self.rfile.read(int(self.headers.get("Content-Length", "0")))
        self._reply(503, b"<Error><Code>ServiceUnavailable</Code></Error>")


@pytest.fixture
def refusing_sink() -> Iterator[str]:
    RefusingSink.attempts = 0
    with loopback_server(RefusingSink) as server:
        yield f"http://127.0.0.1:{server.server_address[1]}/bucket/sink.tar.gz?X-Amz-Signature=sig-not-for-logs"


def test_sink_unreachable_at_flush_retries_a_bounded_number_of_times_then_powers_off(
    tmp_path: Path, start_agent: Callable[..., AgentProcess], refusing_sink: str
) -> None:
    from rawvm_agent.sink import PUT_ATTEMPTS

    marker = tmp_path / "powered-off"
    state = tmp_path / "state"
    agent = start_agent(agent_config(state, sink=refusing_sink, idle={"poweroff_command": ["touch", str(marker)]}))
    agent.wait(serving)
    task = agent.json("POST", "/v1/tasks", {"argv": ["sh", "-c", "echo kept on the disk"]})["id"]
    agent.wait(lambda s: s["tasks"].get("exited") == 1)
    assert agent.request("POST", "/v1/shutdown")[0] == 202
    took = powered_off(agent, marker)
    assert RefusingSink.attempts == PUT_ATTEMPTS  # bounded: tried, retried, then gave up
    log = (state / "agent.log").read_text()
    assert f"failed {PUT_ATTEMPTS} times; logs and telemetry stay on this machine" in log
    assert "sig-not-for-logs" not in log  # the presigned signature never reaches a log
    assert (state / "tasks" / task / "stdout").read_text() == "kept on the disk\n"  # nothing lost locally
    assert json.loads((state / "state.json").read_text())["phase"] == "off"
    print(f"sink refused {PUT_ATTEMPTS} times; powered off {took:.1f}s after the shutdown request")
    reliability.survived("sink unreachable at flush")


# -- a spot interruption notice arrives while a task runs -------------------------------------------------------


def test_spot_notice_mid_task_interrupts_flushes_and_is_off_within_two_minutes(
    tmp_path: Path, start_agent: Callable[..., AgentProcess], imds: ThreadingHTTPServer
) -> None:
    agent, sink, marker = start_spot_agent(tmp_path, start_agent, imds)
    # A task that writes a numbered line every 50 ms and notes SIGTERM: its output up to the end must be kept.
    script = (
        "import signal, sys, time\n"
        "signal.signal(signal.SIGTERM, lambda *a: (print('got SIGTERM', flush=True), sys.exit(143)))\n"
        "i = 0\n"
        "while True:\n    print(i, flush=True); i += 1; time.sleep(0.05)\n"
    )
    task = agent.json("POST", "/v1/tasks", {"argv": ["python", "-c", script]})["id"]
    deadline = time.monotonic() + 30
    while agent.request("GET", f"/v1/tasks/{task}/logs")[1].count(b"\n") < 20 and time.monotonic() < deadline:
        time.sleep(0.1)
    FakeImds.notice = b'{"action": "terminate", "time": "2026-12-02T16:00:00Z"}'
    took = powered_off(agent, marker)
    assert took < 120
    files = flushed(sink)
    lines = files[f"tasks/{task}/stdout"].read_text().splitlines()
    assert lines[-1] == "got SIGTERM" and lines[:-1] == [str(i) for i in range(len(lines) - 1)]  # no line lost
    record = json.loads(files[f"tasks/{task}/task.json"].read_text())
    assert record["state"] == "interrupted" and record["exit_code"] == 143
    assert "spot interruption" in files["agent.log"].read_text()
    assert json.loads(files["state.json"].read_text())["stop_reason"].startswith("spot interruption")
    print(f"spot notice → off in {took:.1f}s, {len(lines) - 1} lines kept")
    reliability.survived("spot notice mid-task")


# -- state.json corrupted or truncated when the agent restarts --------------------------------------------------


def _truncate(text: str) -> str:
    return text[: len(text) // 2]


CORRUPTIONS: dict[str, Callable[[str], str | bytes]] = {
    "truncated": _truncate,
    "empty": lambda text: "",
    "binary garbage": lambda text: bytes(random.Random(1).randbytes(512)),
    "a JSON list": lambda text: "[1, 2, 3]",
    "wrong types": lambda text: json.dumps(
        {**json.loads(text), "started_at": "yesterday", "restarts": "many", "phase": "idle", "idle": [1]}
    ),
    "unknown phase": lambda text: json.dumps({**json.loads(text), "phase": "levitating"}),
}


@pytest.fixture(scope="module")
def real_state_file(tmp_path_factory: pytest.TempPathFactory) -> str:
    """state.json as a real agent leaves it when systemd stops it for a restart (idle, its clock running)."""
    tmp = tmp_path_factory.mktemp("first-run")
    agent = AgentProcess(tmp, agent_config(tmp / "state", idle={"keepalive": "1h", "poweroff_command": ["true"]}))
    try:
        agent.wait(lambda s: s["phase"] == "idle")
    finally:
        agent.stop()
    return (tmp / "state" / "state.json").read_text()


@pytest.mark.parametrize("damage", list(CORRUPTIONS), ids=list(CORRUPTIONS))
def test_corrupt_state_file_on_restart_the_agent_recovers_and_still_powers_off(
    damage: str, tmp_path: Path, start_agent: Callable[..., AgentProcess], real_state_file: str
) -> None:
    marker, state = tmp_path / "powered-off", tmp_path / "state"
    state.mkdir(mode=0o700)
    damaged = CORRUPTIONS[damage](real_state_file)
    state_file = state / "state.json"
    if isinstance(damaged, bytes):
        state_file.write_bytes(damaged)
    else:
        state_file.write_text(damaged)

    agent = start_agent(agent_config(state, idle={"keepalive": "3s", "poweroff_command": ["touch", str(marker)]}))
    status = agent.wait(lambda s: s["phase"] in ("ready", "idle", "busy", "stopping", "off"), timeout=60)
    assert isinstance(status["started_at"], float) and isinstance(status["restarts"], int)
    took = powered_off(agent, marker, timeout=60)  # 3 s of idleness after the restart, then off
    final = json.loads(state_file.read_text())
    assert final["phase"] == "off" and final["stop_reason"].startswith("idle for"), final
    assert final["restarts"] == 0  # started over: the damaged file was not trusted
    assert "is damaged" in (state / "agent.log").read_text()
    print(f"{damage}: recovered, off {took:.1f}s later")
    reliability.survived(f"state.json {damage}")


# -- the state dir's disk fills up during the install ---------------------------------------------------------


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """An 8 MiB tmpfs as the state dir's file system (root only: mount)."""
    mount, umount = need_tool("mount", "mount"), need_tool("umount", "mount")
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root")
    mountpoint = tmp_path / "small-disk"
    mountpoint.mkdir()
    subprocess.run([mount, "-t", "tmpfs", "-o", "size=8m,mode=0700", "tmpfs", str(mountpoint)], check=True)
    try:
        yield mountpoint
    finally:
        subprocess.run([umount, "-l", str(mountpoint)], check=False)


def big_wheel_bundle(root: Path, name: str, megabytes: int, url: str | None = None) -> tuple[Path, Any]:
    """A bundle whose lock holds one wheel carrying ``megabytes`` of incompressible data."""
    blob = random.Random(megabytes).randbytes(megabytes << 20).hex()[: megabytes << 20]
    wheel = make_wheel(root / "artifacts", name, "1.0", {f"{name}/__init__.py": "X = 1\n", f"{name}/blob.txt": blob})
    lock = pylock_for_wheel(wheel, name, "1.0", url=url.format(wheel=wheel.name) if url else None)
    return wheel, write_bundle(root / "bundle", {"pylock.toml": ("pylock", lock.encode())})


def test_disk_full_mid_install_fails_clearly_and_still_powers_off(
    tmp_path: Path, start_agent: Callable[..., AgentProcess], small_disk: Path
) -> None:
    _, bundle = big_wheel_bundle(tmp_path / "src", "bigpkg", megabytes=12)  # 12 MiB into an 8 MiB disk
    sink, marker = tmp_path / "sink", tmp_path / "powered-off"
    state = small_disk / "state"
    config = agent_config(
        state, bundle=bundle, sink=str(sink), idle={"keepalive": "3s", "poweroff_command": ["touch", str(marker)]}
    )
    agent = start_agent(config, extra_env={"UV_CACHE_DIR": str(small_disk / "uv-cache")})
    status = agent.wait(lambda s: s["phase"] == "failed", timeout=120)
    assert "No space left on device" in status["error"] or "os error 28" in status["error"], status["error"]
    assert agent.request("POST", "/v1/tasks", {"argv": ["true"]})[0] == 409
    assert not (state / "env").exists()  # the half-built environment went, leaving room for the logs
    # Then the disk fills up for good (another process, a runaway log): no state save can succeed any more.
    with (small_disk / "filler").open("wb") as filler, contextlib.suppress(OSError):
        while True:
            filler.write(b"\0" * (1 << 16))
            filler.flush()
    took = powered_off(agent, marker)
    files = flushed(sink)
    log = files["agent.log"].read_text()
    assert "install failed" in log and ("No space left on device" in log or "os error 28" in log)
    saved = json.loads(files["state.json"].read_text())  # the last state that fitted on the disk
    assert saved["phase"] == "failed" and saved["error"] == status["error"]
    stderr = agent.stderr_path.read_text()
    assert "going on without it" in stderr and "stopping: idle for" in stderr  # the save failed; the stop did not
    print(f"disk full: failed with {status['error'][:120]!r}; off {took:.1f}s later")
    reliability.survived("disk full mid-install")


# -- the package index dies half way through the install ------------------------------------------------------


class DyingIndex(QuietHandler):
    """Serves wheels from ``root``: the first one whole, the next one half, then the server goes away."""

    root: Path
    served: list[str] = []
    server: ThreadingHTTPServer

    def do_GET(self) -> None:
        path = self.root / self.path.rsplit("/", 1)[-1]
        if not path.is_file():
            self.send_error(404)
            return
        data = path.read_bytes()
        self.send_response(200)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        DyingIndex.served.append(path.name)
        if len(DyingIndex.served) == 1:
            self.wfile.write(data)
            return
        self.wfile.write(data[: len(data) // 2])  # half a wheel, then the mirror dies
        self.wfile.flush()
        threading.Thread(target=DyingIndex.die, daemon=True).start()
        self.close_connection = True

    @staticmethod
    def die() -> None:
        DyingIndex.server.shutdown()
        DyingIndex.server.server_close()  # the port is closed too: connection refused from now on


def test_package_index_dying_mid_install_fails_clearly_and_still_powers_off(
    tmp_path: Path, start_agent: Callable[..., AgentProcess]
) -> None:
    import tomli_w

    server = ThreadingHTTPServer(("127.0.0.1", 0), DyingIndex)
    DyingIndex.root, DyingIndex.served, DyingIndex.server = tmp_path / "index", [], server
    DyingIndex.root.mkdir()
    base = f"http://127.0.0.1:{server.server_address[1]}/packages"
    # Two locked wheels, served by the loopback mirror at the lock's URLs: a small one, then a 3 MiB one.
    wheels = []
    for name, size in (("smallpkg", 0), ("bigpkg", 3)):
        blob = random.Random(size).randbytes(size << 20).hex()[: size << 20]
        wheel = make_wheel(tmp_path / "artifacts", name, "1.0", {f"{name}/__init__.py": "X = 1\n", f"{name}/b": blob})
        shutil.copy(wheel, DyingIndex.root / wheel.name)
        wheels.append((name, wheel))
    lock = {
        "lock-version": "1.0",
        "created-by": "rawvm-tests",
        "requires-python": ">=3.11",
        "packages": [
            {
                "name": name,
                "version": "1.0",
                "wheels": [
                    {
                        "url": f"{base}/{wheel.name}",
                        "size": wheel.stat().st_size,
                        "hashes": {"sha256": hashlib.sha256(wheel.read_bytes()).hexdigest()},
                    }
                ],
            }
            for name, wheel in wheels
        ],
    }
    bundle = write_bundle(tmp_path / "bundle", {"pylock.toml": ("pylock", tomli_w.dumps(lock).encode())})
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    sink, marker = tmp_path / "sink", tmp_path / "powered-off"
    config = agent_config(
        tmp_path / "state",
        bundle=bundle,
        sink=str(sink),
        idle={"keepalive": "3s", "poweroff_command": ["touch", str(marker)]},
    )
    try:
        # A cold uv cache of its own, so uv really downloads from the mirror; one download at a time, in order.
        agent = start_agent(
            config, extra_env={"UV_CACHE_DIR": str(tmp_path / "uv-cache"), "UV_CONCURRENT_DOWNLOADS": "1"}
        )
        status = agent.wait(lambda s: s["phase"] == "failed", timeout=180)
        took = powered_off(agent, marker)
    finally:
        if len(DyingIndex.served) < 2:
            DyingIndex.die()
    assert len(DyingIndex.served) == 2  # one wheel whole, one cut off: the index died mid-install
    # One line saying what failed and why: the download of the wheel the mirror cut off, refused by the dead port.
    assert status["error"].startswith("uv pip sync failed: "), status["error"]
    cut_off = DyingIndex.served[1].split("-")[0]
    assert f"Failed to download `{cut_off}" in status["error"] and "Connection refused" in status["error"]
    files = flushed(sink)
    assert "install failed" in files["agent.log"].read_text()
    assert files["install.log"].read_text().strip()  # uv's own account of the failed download is kept
    saved = json.loads(files["state.json"].read_text())  # flushed while stopping, the step before off
    assert saved["phase"] == "stopping" and saved["error"] == status["error"], saved
    print(f"index died: failed with {status['error'][:160]!r}; off {took:.1f}s later")
    reliability.survived("package index dying mid-install")
