"""The real thing: ``python -m rawvm_agent --config agent.toml`` as a process on loopback, a real bundle,
real uv, real HTTP. These are the issue's end-to-end checks for the agent core.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from http.server import ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from tests.agent.core_helpers import TOKEN, Bundle, agent_config, tiny_bundle, write_config
from tests.helpers.http import QuietHandler, loopback_server
from tests.helpers.processes import stop
from tests.helpers.tls import make_test_channel, secured

pytestmark = pytest.mark.slow

AGENT_SECRET = "agent-env-secret-9f8e7d6c"  # in the agent's own environment, named in secret_env
TASK_SECRET = "task-secret-1a2b3c4d5e"  # passed in a task request, named in its secret_env


class AgentProcess:
    def __init__(
        self, tmp_path: Path, config: dict[str, Any], name: str = "agent", extra_env: dict[str, str] | None = None
    ) -> None:
        # As a launch writes it: mutual TLS with a cluster CA of its own, the token only as its sha256.
        self.channel = make_test_channel(tmp_path / f"{name}-tls")
        self.config = config = secured(config, self.channel)
        self.url = f"https://127.0.0.1:{config['port']}"
        self.config_path = write_config(tmp_path / f"{name}.toml", config)
        self.stderr_path = tmp_path / f"{name}.stderr"
        env = {**os.environ, "AGENT_SECRET": AGENT_SECRET}
        env.pop("NOTIFY_SOCKET", None)
        env.update(extra_env or {})
        with self.stderr_path.open("wb") as err:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "rawvm_agent", "--config", str(self.config_path)],
                stdout=err,
                stderr=subprocess.STDOUT,
                env=env,
            )

    def request(self, method: str, path: str, body: Any = None, token: str | None = TOKEN) -> tuple[int, bytes, Any]:
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(self.url + path, data=data, method=method)
        if token is not None:
            req.add_header("Authorization", f"Bearer {token}")
        if data is not None:
            req.add_header("Content-Type", "application/json")
        try:
            with urllib.request.urlopen(req, timeout=120, context=self.channel.context()) as resp:
                return resp.status, resp.read(), resp.headers
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read(), exc.headers

    def json(self, method: str, path: str, body: Any = None) -> Any:
        status, data, _ = self.request(method, path, body)
        assert status < 300, (status, data)
        return json.loads(data)

    def wait(self, predicate: Callable[[dict[str, Any]], bool], timeout: float = 120.0) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        last: dict[str, Any] = {}
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, f"agent exited early: {self.stderr_path.read_text()[-2000:]}"
            try:
                last = self.json("GET", "/v1/status")
                if predicate(last):
                    return last
            except (urllib.error.URLError, ConnectionError):
                pass
            time.sleep(0.1)
        raise AssertionError(f"status never matched; last: {last}")

    def stop(self) -> None:
        stop(self.proc, timeout=30)


@pytest.fixture
def start_agent(tmp_path: Path) -> Iterator[Callable[..., AgentProcess]]:
    started: list[AgentProcess] = []

    def start(config: dict[str, Any], name: str = "agent", extra_env: dict[str, str] | None = None) -> AgentProcess:
        agent = AgentProcess(tmp_path, config, name, extra_env)
        started.append(agent)
        return agent

    yield start
    for agent in started:
        agent.stop()


def serving(status: dict[str, Any]) -> bool:
    return status["phase"] in ("ready", "idle", "busy")


def run_task(agent: AgentProcess, body: dict[str, Any]) -> tuple[dict[str, Any], bytes, bytes]:
    task_id = agent.json("POST", "/v1/tasks", body)["id"]
    _, stdout, headers = agent.request("GET", f"/v1/tasks/{task_id}/logs?follow=1")  # returns when the task ends
    assert headers["X-Next-Offset"] == "0"
    _, stderr, _ = agent.request("GET", f"/v1/tasks/{task_id}/logs?stream=stderr")
    return agent.json("GET", f"/v1/tasks/{task_id}"), stdout, stderr


def all_text_under(*roots: Path) -> dict[Path, bytes]:
    out = {}
    for root in roots:
        for path in root.rglob("*"):
            if path.is_file() and not path.is_symlink():
                out[path] = path.read_bytes()
    return out


def test_real_agent_installs_runs_tasks_and_keeps_secrets(
    tmp_path: Path, start_agent: Callable[..., AgentProcess]
) -> None:
    bundle = tiny_bundle(tmp_path / "src", exit_code=7)
    marker, sink = tmp_path / "powered-off", tmp_path / "sink"
    config = agent_config(
        tmp_path / "state",
        bundle=bundle,
        sink=str(sink),
        secret_env=["AGENT_SECRET"],
        idle={"poweroff_command": ["touch", str(marker)]},
    )
    agent = start_agent(config)
    status = agent.wait(serving)
    assert status["install"]["step"] == "done" and status["install"]["packages_done"] == 2
    assert {"booting", "installing", "ready"} <= status["phase_times"].keys()

    task, stdout, stderr = run_task(agent, {"argv": ["python", "main.py"]})
    assert task["state"] == "exited" and task["exit_code"] == 7
    assert b"hello from tinydep via tinyapp" in stdout
    assert f"venv {tmp_path / 'state' / 'env'}".encode() in stdout
    assert f"cwd {tmp_path / 'state' / 'work'}".encode() in stdout
    assert stderr == b"oops\n"

    leak = "import os; print('task', os.environ['TOKEN_ISH']); print('agent', os.environ['AGENT_SECRET'])"
    task, stdout, _ = run_task(
        agent, {"argv": ["python", "-c", leak], "env": {"TOKEN_ISH": TASK_SECRET}, "secret_env": ["TOKEN_ISH"]}
    )
    assert task["exit_code"] == 0
    assert stdout == b"task ***\nagent ***\n"

    # No token, wrong token: 401 on every route of the real server but /healthz.
    for method, path in [("GET", "/v1/status"), ("GET", "/metrics"), ("GET", "/v1/samples"), ("POST", "/v1/shutdown")]:
        for token in (None, "wrong", TOKEN + "x"):
            assert agent.request(method, path, token=token)[0] == 401, (method, path, token)
    assert agent.request("GET", "/healthz", token=None)[:2] == (200, b"ok")

    assert agent.request("POST", "/v1/shutdown")[0] == 202
    assert agent.proc.wait(60) == 0
    assert marker.exists()
    flushed = all_text_under(sink)
    assert any(p.name == "agent.log" for p in flushed)
    assert any(p.name == "stdout" and b"hello from tinydep" in data for p, data in flushed.items())

    # The token and the secret values appear in no log, no task output, no state file, nor the agent's stderr.
    everything = {**all_text_under(tmp_path / "state", sink), agent.stderr_path: agent.stderr_path.read_bytes()}
    everything.pop(agent.config_path, None)  # agent.toml holds the token by design (mode 0600 on a VM)
    assert len(everything) > 10
    for secret in (TOKEN, AGENT_SECRET, TASK_SECRET):
        leaks = [str(p) for p, data in everything.items() if secret.encode() in data]
        assert leaks == [], f"{secret} leaked into {leaks}"


def test_bundle_with_wrong_sha256_is_refused(tmp_path: Path, start_agent: Callable[..., AgentProcess]) -> None:
    bundle = tiny_bundle(tmp_path / "src")
    wheel = next((bundle.dir / "wheels").iterdir())
    wheel.write_bytes(wheel.read_bytes()[:-10] + b"0123456789")  # same size, different bytes
    agent = start_agent(agent_config(tmp_path / "state", bundle=bundle))
    status = agent.wait(lambda s: s["phase"] == "failed")
    assert "sha256" in status["error"] and wheel.name in status["error"]
    assert agent.request("POST", "/v1/tasks", {"argv": ["true"]})[0] == 409
    state = tmp_path / "state"
    assert not (state / "env").exists() and not (state / "work").exists() and not (state / "bundle").exists()
    # Nothing from the bundle was installed: at most the empty venv was made while the files downloaded
    # (installer.py), and it is gone.
    log = (state / "install.log").read_text() if (state / "install.log").exists() else ""
    assert " pip " not in log, log


def test_power_off_runs_5_to_7_s_after_the_last_task_ends(
    tmp_path: Path, start_agent: Callable[..., AgentProcess]
) -> None:
    """The issue's one real-time check. CPU load on this shared machine is not ours to control, so the CPU
    threshold is set out of reach here; the CPU and GPU rules have their own fake-clock property tests."""
    marker = tmp_path / "powered-off-at"
    write_time = "import sys, time; open(sys.argv[1], 'w').write(repr(time.time()))"
    config = agent_config(
        tmp_path / "state",
        idle={
            "keepalive": "5s",
            "client_timeout": "1s",
            "window": "1s",
            "cpu_threshold": 101.0,
            "poweroff_command": [sys.executable, "-c", write_time, str(marker)],
        },
    )
    agent = start_agent(config)
    agent.wait(serving)
    task, _, _ = run_task(agent, {"argv": ["sleep", "2"]})
    assert task["exit_code"] == 0
    assert agent.proc.wait(30) == 0
    delay = float(marker.read_text()) - task["ended_at"]
    print(f"power-off {delay:.2f}s after the last task ended")
    assert 5.0 <= delay <= 7.0, f"power-off {delay:.2f}s after the last task ended"
    state = json.loads((tmp_path / "state" / "state.json").read_text())
    assert state["phase"] == "off" and state["stop_reason"].startswith("idle for")


def test_restarted_agent_resumes_instead_of_reinstalling(
    tmp_path: Path, start_agent: Callable[..., AgentProcess]
) -> None:
    bundle: Bundle = tiny_bundle(tmp_path / "src")
    config = agent_config(tmp_path / "state", bundle=bundle)
    first = start_agent(config, "first")
    before = first.wait(lambda s: s["phase"] == "idle")
    first.stop()
    assert first.proc.returncode == 0
    install_log = (tmp_path / "state" / "install.log").read_text()

    second = start_agent(config, "second")
    after = second.wait(lambda s: s["restarts"] == 1 and s["phase"] == "idle")
    assert after["idle"]["idle_since"] == before["idle"]["idle_since"]  # the idle clock went on
    assert after["phase_times"]["installing"] == before["phase_times"]["installing"]
    assert (tmp_path / "state" / "install.log").read_text() == install_log  # uv did not run again
    task, stdout, _ = run_task(second, {"argv": ["python", "main.py"]})
    assert task["exit_code"] == 7 and b"hello from tinydep" in stdout


def test_bad_config_is_one_line_and_exit_2(tmp_path: Path) -> None:
    bad = tmp_path / "agent.toml"
    bad.write_text('token = "t"\n[idle]\nkeepalive = "soon"\n')
    proc = subprocess.run(
        [sys.executable, "-m", "rawvm_agent", "--config", str(bad)], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and "keepalive" in proc.stderr and "Traceback" not in proc.stderr
    missing = subprocess.run(
        [sys.executable, "-m", "rawvm_agent", "--config", str(tmp_path / "nope.toml")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert missing.returncode == 2 and "not found" in missing.stderr


class FakeImds(QuietHandler):
    """IMDSv2 as EC2 serves it for spot: a session token by PUT, then instance-action (404 until announced)."""

    token = "imds-session-token"
    notice: bytes | None = None

    def do_PUT(self) -> None:
        if self.path == "/latest/api/token" and self.headers.get("X-aws-ec2-metadata-token-ttl-seconds"):
            self._reply(200, self.token.encode())
        else:
            self._reply(400, b"")

    def do_GET(self) -> None:
        if self.headers.get("X-aws-ec2-metadata-token") != self.token:
            self._reply(401, b"")  # IMDSv1 (no token) is refused, as on an instance with IMDSv2 required
        elif self.path == "/latest/meta-data/spot/instance-action" and FakeImds.notice is not None:
            self._reply(200, FakeImds.notice)
        else:
            self._reply(404, b"")


@pytest.fixture
def imds() -> Iterator[ThreadingHTTPServer]:
    FakeImds.notice = None
    with loopback_server(FakeImds) as server:
        yield server


def start_spot_agent(
    tmp_path: Path, start_agent: Callable[..., AgentProcess], imds: ThreadingHTTPServer
) -> tuple[AgentProcess, Path, Path]:
    """A serving agent that polls the fake IMDS every second, flushes to a directory sink and powers off by
    touching a marker: (agent, sink, marker)."""
    sink, marker = tmp_path / "sink", tmp_path / "powered-off"
    config = agent_config(
        tmp_path / "state",
        sink=str(sink),
        spot={"enabled": True, "imds_url": f"http://127.0.0.1:{imds.server_address[1]}", "poll": "1s"},
        idle={"poweroff_command": ["touch", str(marker)]},
    )
    agent = start_agent(config)
    agent.wait(serving)
    return agent, sink, marker


def test_spot_notice_stops_within_10_s_and_flushes(
    tmp_path: Path, start_agent: Callable[..., AgentProcess], imds: ThreadingHTTPServer
) -> None:
    agent, sink, marker = start_spot_agent(tmp_path, start_agent, imds)
    task_id = agent.json("POST", "/v1/tasks", {"argv": ["sh", "-c", "echo working; sleep 300"]})["id"]
    agent.wait(lambda s: s["phase"] == "busy")
    time.sleep(1.5)  # a few polls that find no notice
    assert agent.proc.poll() is None

    FakeImds.notice = b'{"action": "terminate", "time": "2026-11-24T22:00:00Z"}'
    announced = time.monotonic()
    assert agent.proc.wait(10) == 0
    assert time.monotonic() - announced < 10
    assert marker.exists()
    flushed = {p.relative_to(next(sink.iterdir())).as_posix(): p for p in sink.rglob("*") if p.is_file()}
    assert "agent.log" in flushed and "spot interruption" in flushed["agent.log"].read_text()
    assert flushed[f"tasks/{task_id}/stdout"].read_text() == "working\n"
    assert json.loads(flushed[f"tasks/{task_id}/task.json"].read_text())["state"] == "interrupted"
    assert any(name.startswith("telemetry/") for name in flushed)
    state = json.loads(flushed["state.json"].read_text())
    assert state["stop_reason"].startswith("spot interruption") and "terminate" in state["stop_reason"]


def test_systemd_ready_status_and_watchdog_from_the_event_loop(
    tmp_path: Path, start_agent: Callable[..., AgentProcess]
) -> None:
    """The agent as systemd runs it (Type=notify, WatchdogSec=): the datagrams on $NOTIFY_SOCKET."""
    address = str(tmp_path / "notify.sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(address)
        sock.settimeout(0.2)
        agent = start_agent(
            agent_config(tmp_path / "state"), extra_env={"NOTIFY_SOCKET": address, "WATCHDOG_USEC": "1000000"}
        )
        messages: list[str] = []
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and messages.count("WATCHDOG=1") < 4:
            with contextlib.suppress(TimeoutError):
                messages.append(sock.recv(4096).decode())
        assert "READY=1" in messages
        assert messages.count("WATCHDOG=1") >= 4  # every 0.5 s: half of WatchdogSec
        assert any(m.startswith("STATUS=rawvm-agent: ") for m in messages)
        assert agent.request("GET", "/healthz", token=None)[0] == 200
        agent.stop()
        with contextlib.suppress(TimeoutError):
            while True:
                messages.append(sock.recv(4096).decode())
        assert "STOPPING=1" in messages
    assert agent.proc.returncode == 0
