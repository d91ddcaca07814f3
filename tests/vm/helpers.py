"""Helpers for the real-VM tests: a small real bundle, a tiny agent API client, and waits on the guest.

The bundle is a hand-made Contract-1 bundle whose ``pylock.toml`` is resolved for the VM's target by the real
``uv pip compile --format pylock.toml`` against PyPI (no resolver shortcut, no hard-coded hashes).
"""

from __future__ import annotations

import hashlib
import json
import ssl
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import tomli_w
from rawvm_agent.config import BundleConfig, BundleFile

HOST_CA_DIR = Path("/usr/local/share/ca-certificates")


def host_extra_ca_certs() -> tuple[Path, ...]:
    """The egress proxy's CAs this host trusts; the guest gets them through the user-data's extra-CA option."""
    return tuple(sorted(HOST_CA_DIR.glob("*.crt")))


def sha256_file(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def make_bundle(directory: Path, requirements: list[str], *, python: str, glibc: str) -> Path:
    """A Contract-1 bundle (rawvm-env.toml + pylock.toml) for linux-x86_64 ``glibc``/``python``."""
    directory.mkdir(parents=True, exist_ok=True)
    requirements_in = directory.parent / f"{directory.name}.in"
    requirements_in.write_text("\n".join(requirements) + "\n")
    subprocess.run(
        [
            "uv",
            "pip",
            "compile",
            "--quiet",
            "--no-header",
            "--format",
            "pylock.toml",
            "--python-version",
            python,
            "--python-platform",
            f"x86_64-manylinux_{glibc.replace('.', '_')}",
            "--output-file",
            str(directory / "pylock.toml"),
            str(requirements_in),
        ],
        check=True,
    )
    manifest = {
        "format": 1,
        "target": {"os": "linux", "arch": "x86_64", "glibc": glibc, "python": python, "accelerator": "cpu", "cuda": ""},
        "source": {"python": python, "platform": "test", "fingerprint": ""},
        "install": {"index_url": "", "extra_index_urls": []},
        "files": [{"path": "pylock.toml", "sha256": sha256_file(directory / "pylock.toml"), "kind": "pylock"}],
        "report": [],
    }
    (directory / "rawvm-env.toml").write_text(tomli_w.dumps(manifest))
    return directory


def bundle_config(bundle: Path, urls: dict[str, str], prefix: str) -> BundleConfig:
    """The agent.toml ``[bundle]`` for a staged bundle (``urls`` keyed by ``prefix/<relative path>``)."""
    files = tuple(
        BundleFile(path=rel, url=urls[f"{prefix}/{rel}"], sha256=sha256_file(bundle / rel))
        for rel in sorted(p.relative_to(bundle).as_posix() for p in bundle.rglob("*") if p.is_file())
    )
    return BundleConfig(files=files, manifest_sha256=sha256_file(bundle / "rawvm-env.toml"))


@dataclass
class AgentClient:
    """Just enough of the agent API (Contract 4) for the tests, over stdlib urllib."""

    base_url: str
    token: str
    tls: ssl.SSLContext  # the cluster CA pinned, the laptop's client certificate presented

    def request(self, method: str, path: str, body: Any = None, timeout: float = 10.0) -> Any:
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(self.base_url + path, data=data, method=method)
        req.add_header("Authorization", f"Bearer {self.token}")
        if data is not None:
            req.add_header("Content-Type", "application/json")
        with urllib.request.urlopen(req, timeout=timeout, context=self.tls) as response:
            raw = response.read()
        ctype = response.headers.get("Content-Type", "")
        return json.loads(raw) if "json" in ctype else raw

    def healthy(self) -> bool:
        try:
            with urllib.request.urlopen(self.base_url + "/healthz", timeout=5, context=self.tls) as response:
                return bool(response.status == 200)
        except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
            return False

    def status(self) -> dict[str, Any]:
        answer: dict[str, Any] = self.request("GET", "/v1/status")
        return answer

    def run_task(self, argv: list[str]) -> str:
        answer = self.request("POST", "/v1/tasks", {"argv": argv, "env": {}, "cwd": "", "secret_env": []})
        return str(answer["id"])

    def task(self, task_id: str) -> dict[str, Any]:
        answer: dict[str, Any] = self.request("GET", f"/v1/tasks/{task_id}")
        return answer

    def logs(self, task_id: str, stream: str = "stdout") -> bytes:
        data: bytes = self.request("GET", f"/v1/tasks/{task_id}/logs?offset=0&stream={stream}")
        return data


def wait_for(what: str, check: Callable[[], bool], timeout: float, on_timeout: Callable[[], str]) -> float:
    """Poll ``check`` every second until true; returns when it became true (time.monotonic())."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return time.monotonic()
        time.sleep(1.0)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}\n{on_timeout()}")


def tail(path: Path, lines: int = 60) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except FileNotFoundError:
        return f"({path} does not exist)"
