"""``rawvm shell``, ``cp`` and ``forward`` on local machines (real agent processes, the real CLI), and idleness that
knows about a person at a shell."""

from __future__ import annotations

import hashlib
import json
import os
import shlex
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.helpers.local import local_project, processes_under
from tests.systools import need_tool

pytestmark = [pytest.mark.network, pytest.mark.slow]


def rawvm(*args: str, env: dict[str, str], cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "rawvm.cli", *args], env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout
    )


class Cluster:
    def __init__(self, root: Path, keepalive: str) -> None:
        self.project, self.tmp, self.env = local_project(root, {"requirements.txt": ""})
        up = self.run("up", "--keepalive", keepalive, "--from", "requirements.txt")
        assert up.returncode == 0, up.stderr
        self.name = up.stdout.strip()

    def run(self, *args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
        return rawvm(*args, env=self.env, cwd=self.project, timeout=timeout)

    def down(self) -> None:
        self.run("down", self.name)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    made = Cluster(tmp_path_factory.mktemp("interactive"), "5m")
    yield made
    made.down()


def _wait_for(what: str, check: Callable[[], bool], timeout: float = 20.0, seen: Callable[[], object] = str) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} within {timeout} s: {seen()}")
        time.sleep(0.2)


def test_shell_through_tmux(cluster: Cluster) -> None:
    """A real terminal (tmux) in raw mode: typed arithmetic, window resize, Ctrl-C to the remote foreground job,
    and ``exit 3`` making ``rawvm shell`` exit 3."""
    tmux = need_tool("tmux", "tmux")
    server = f"rawvm-test-{uuid.uuid4().hex[:8]}"
    env = " ".join(f"{k}={shlex.quote(cluster.env[k])}" for k in ("RAWVM_STATE_DIR", "TMPDIR"))
    command = f"cd {shlex.quote(str(cluster.project))} && env {env} {shlex.quote(sys.executable)} -m rawvm.cli "
    command += f"shell {cluster.name}; echo EXITED=$?; sleep 60"

    def tm(*args: str) -> str:
        return subprocess.run([tmux, "-L", server, *args], capture_output=True, text=True, check=True).stdout

    def screen() -> list[str]:
        return [line.rstrip() for line in tm("capture-pane", "-p", "-J").splitlines()]

    tm("new-session", "-d", "-x", "120", "-y", "30", command)
    try:
        tm("send-keys", "echo $((6*7))", "Enter")
        _wait_for("42 on the screen", lambda: "42" in screen(), seen=screen)
        tm("send-keys", "sleep 100", "Enter")
        time.sleep(1)
        tm("send-keys", "C-c")  # passes through as a byte: the machine's terminal interrupts the sleep
        tm("send-keys", "echo after-$((1+1))", "Enter")
        _wait_for("the interrupted sleep gives the prompt back", lambda: "after-2" in screen(), timeout=10)
        tm("resize-window", "-x", "100", "-y", "30")
        time.sleep(1)
        tm("send-keys", "echo cols=$(tput cols)", "Enter")
        _wait_for("the new width on the machine", lambda: "cols=100" in screen())
        tm("send-keys", "exit 3", "Enter")
        _wait_for("rawvm shell exits with the remote code", lambda: "EXITED=3" in screen())
    finally:
        subprocess.run([tmux, "-L", server, "kill-server"], capture_output=True)


def test_shell_command_without_a_terminal(cluster: Cluster) -> None:
    result = cluster.run("shell", cluster.name, "m0", "--", "echo $((6*7)); echo oops >&2; cat; exit 5")
    assert result.returncode == 5
    assert result.stdout == "42\n"
    assert "oops" in result.stderr
    piped = subprocess.run(
        [sys.executable, "-m", "rawvm.cli", "shell", cluster.name, "--", "wc -c"],
        input=b"x" * 100_000,
        env=cluster.env,
        cwd=cluster.project,
        capture_output=True,
        timeout=60,
    )
    assert piped.returncode == 0 and piped.stdout.strip() == b"100000"
    bad = cluster.run("shell", cluster.name, "m7", "--", "true")
    assert bad.returncode == 2 and bad.stderr.strip() == f"rawvm: cluster {cluster.name} has no machine 'm7': it has m0"


def _digests(root: Path) -> dict[str, str]:
    return {
        path.relative_to(root).as_posix(): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(root.rglob("*"))
        if path.is_file()
    }


def test_cp_round_trips_a_200_mib_file_and_a_tree(cluster: Cluster, tmp_path: Path) -> None:
    big = tmp_path / "big.bin"
    with big.open("wb") as handle:
        for _ in range(200):
            handle.write(os.urandom(1 << 20))
    up = cluster.run("cp", str(big), "m0:in/big.bin")
    assert up.returncode == 0, up.stderr
    back = tmp_path / "back"
    back.mkdir()
    down = cluster.run("cp", "m0:in/big.bin", f"{back}/")
    assert down.returncode == 0, down.stderr
    assert "200.0 MiB" in down.stderr
    assert _digests(back) == {"big.bin": _digests(tmp_path)["big.bin"]}
    # The same bytes on the machine, where tasks run (paths relative to the work dir).
    remote = cluster.run("shell", cluster.name, "--", "sha256sum in/big.bin")
    assert remote.stdout.split()[0] == _digests(back)["big.bin"]

    tree = tmp_path / "tree"
    for rel, data in {"a.txt": b"a\n", "sub/b.bin": os.urandom(300_000), "sub/deep/c": b"", "d e": b"x"}.items():
        (tree / rel).parent.mkdir(parents=True, exist_ok=True)
        (tree / rel).write_bytes(data)
    assert cluster.run("cp", f"{tree}/", "m0:data").returncode == 0  # 'dir/': what it holds becomes m0:data
    copy = tmp_path / "copy"
    result = cluster.run("cp", "m0:data", str(copy))  # copy does not exist: it becomes the directory
    assert result.returncode == 0, result.stderr
    assert _digests(copy) == _digests(tree)
    again = cluster.run("cp", "m0:data", str(copy))  # now it exists: cp -r puts data inside it
    assert again.returncode == 0 and _digests(copy / "data") == _digests(tree)

    missing = cluster.run("cp", "m0:nothing-here", str(tmp_path))
    assert missing.returncode == 1 and "no such file or directory" in missing.stderr
    both_local = cluster.run("cp", str(tree), str(tmp_path / "x"))
    assert both_local.returncode == 2 and "MACHINE:PATH" in both_local.stderr


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_forward_reaches_a_server_on_the_machines_loopback(cluster: Cluster) -> None:
    remote, local = _free_port(), _free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "rawvm.cli", "run", "--cluster", cluster.name, "--", "sh", "-c",
         f"echo hello through the tunnel > served.txt && exec python -m http.server {remote} --bind 127.0.0.1"],
        env=cluster.env, cwd=cluster.project, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    forward = subprocess.Popen(
        [sys.executable, "-m", "rawvm.cli", "forward", cluster.name, f"{local}:{remote}"],
        env=cluster.env, cwd=cluster.project, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        body = ""

        def answers() -> bool:
            nonlocal body
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{local}/served.txt", timeout=5) as response:
                    body = response.read().decode()
            except OSError:
                return False
            return True

        _wait_for("the server answers through the forward", answers, timeout=60)
        assert body == "hello through the tunnel\n"
        for _ in range(3):  # each request is a connection of its own, and a websocket of its own
            assert answers() and body == "hello through the tunnel\n"
    finally:
        forward.terminate()
        forward.wait(10)
        server.terminate()
        server.wait(10)
    assert forward.stderr is not None
    assert f"forwarding 127.0.0.1:{local} to port {remote} on m0's loopback" in forward.stderr.read()


def test_a_machine_with_a_shell_open_stays_up_and_idles_off_after_it_closes(tmp_path: Path) -> None:
    """keepalive 5 s: two shells held open for 12 s keep the machine up; one exits cleanly and the other still
    holds it; the other's laptop then vanishes (SIGKILL: its connection just drops), and the machine is gone
    within keepalive + 15 s."""
    idle = Cluster(tmp_path, "5s")

    def open_shell() -> subprocess.Popen[bytes]:
        return subprocess.Popen(
            [sys.executable, "-m", "rawvm.cli", "shell", idle.name],
            env=idle.env, cwd=idle.project, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        )  # fmt: skip

    def running() -> list[int]:
        return [v["running"] for v in json.loads(idle.run("ls", "--json").stdout) if v["name"] == idle.name]

    try:
        clean, vanishing = open_shell(), open_shell()
        time.sleep(12)
        assert clean.poll() is None and vanishing.poll() is None
        assert running() == [1], "the machine powered off under open shells"
        assert clean.stdin is not None and clean.stdout is not None
        clean.stdin.write(b"echo still-here; exit 4\n")
        clean.stdin.close()
        assert clean.wait(30) == 4
        assert clean.stdout.read() == b"still-here\n"
        time.sleep(8)
        assert running() == [1], "the machine powered off while a shell was still open"
        vanishing.kill()
        vanishing.wait(10)
        gone = time.monotonic()
        _wait_for("the machine powers off once no shell is open", lambda: not processes_under(idle.tmp), timeout=20)
        assert time.monotonic() - gone <= 5 + 15
    finally:
        idle.down()
