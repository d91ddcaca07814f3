"""The agent's venv built on the laptop (rawvm.agent.runtime): real uv, real wheels, a real archive.

That the archive runs the agent with a Debian ``/usr/bin/python3`` once the user-data unpacked it is
tests/bootstrap/test_userdata.py's (the script itself, on this host) and the qemu VM test's (a real boot).
"""

from __future__ import annotations

import hashlib
import tarfile
from pathlib import Path

import pytest
from rawvm.agent.requirements import REQUIREMENTS_NAME
from rawvm.agent.runtime import AGENT_VENV, SYSTEM_PYTHON, RuntimeTarget, build_agent_runtime
from rawvm.agent.staged import stage_agent
from rawvm.agent.wheel import build_agent_wheel

HOST = RuntimeTarget("3.11", "x86_64", "2.36")  # the qemu image's: Debian 12 (the workspace's own Python too)
ELF_MACHINE = {"x86_64": 62, "aarch64": 183}  # e_machine of an ELF header


@pytest.fixture
def own_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty rawvm cache (archives are cached there), the agent wheel copied into it."""
    wheel = build_agent_wheel(tmp_path / "wheel")
    monkeypatch.setenv("RAWVM_CACHE_DIR", str(tmp_path / "cache"))
    return wheel


def members(archive: Path) -> dict[str, tarfile.TarInfo]:
    with tarfile.open(archive) as tar:
        return {m.name: m for m in tar.getmembers()}


def read(archive: Path, name: str) -> bytes:
    with tarfile.open(archive) as tar:
        member = tar.extractfile(name)
        assert member is not None
        return member.read()


def test_the_archive_is_the_agents_venv_for_the_machine(own_cache: Path) -> None:
    archive = build_agent_runtime(own_cache, HOST)
    found = members(archive)
    site = "lib/python3.11/site-packages"
    assert found["bin/python"].issym() and found["bin/python"].linkname == SYSTEM_PYTHON
    assert found["bin/python3"].linkname == "python" and found["bin/python3.11"].linkname == "python"
    entry = read(archive, "bin/rawvm-agent").decode()
    assert entry.startswith(f"#!{AGENT_VENV}/bin/python\n") and "from rawvm_agent.__main__ import main" in entry
    assert found["bin/rawvm-agent"].mode == 0o755
    config = read(archive, "pyvenv.cfg").decode()
    assert "home = /usr/bin\n" in config and "include-system-site-packages = false" in config
    for package in ("aiohttp", "msgpack", "psutil", "rawvm_agent", "yarl", "multidict"):
        assert f"{site}/{package}/__init__.py" in found, package
    assert f"{site}/pynvml.py" in found
    assert not [n for n in found if n.startswith(f"{site}/bin/")]  # uv's scripts name this machine's Python
    assert all(m.uid == 0 and m.gid == 0 and m.mtime == 315532800 for m in found.values())
    assert all(not m.name.startswith(("/", "..")) and ".." not in m.name.split("/") for m in found.values())
    so = [n for n in found if n.startswith(f"{site}/aiohttp/") and n.endswith(".so")]
    assert so and all("cpython-311-x86_64-linux-gnu" in n for n in so)
    assert f"{site}/aiohttp/__pycache__/__init__.cpython-311.pyc" in found  # compiled by this Python 3.11


def test_the_same_inputs_give_the_same_bytes_and_the_archive_is_cached(
    own_cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    first = build_agent_runtime(own_cache, HOST)
    assert build_agent_runtime(own_cache, HOST) == first  # from the cache
    monkeypatch.setenv("RAWVM_CACHE_DIR", str(tmp_path / "another-cache"))
    second = build_agent_runtime(own_cache, HOST)
    assert second != first and second.name == first.name
    assert hashlib.sha256(second.read_bytes()).digest() == hashlib.sha256(first.read_bytes()).digest()


@pytest.mark.network
def test_an_archive_for_an_arm_machine_with_another_python_holds_its_wheels(own_cache: Path) -> None:
    """EC2's Graviton machines run Ubuntu 24.04 (Python 3.12, glibc 2.39): the archive built here, on x86_64
    with Python 3.11, holds aarch64 cp312 extensions (checked in their ELF headers)."""
    target = RuntimeTarget("3.12", "aarch64", "2.39")
    archive = build_agent_runtime(own_cache, target)
    site = "lib/python3.12/site-packages"
    so = [n for n in members(archive) if n.startswith(f"{site}/") and n.endswith(".so")]
    assert any("/aiohttp/" in n for n in so) and any("/psutil/" in n for n in so)
    for name in so:
        header = read(archive, name)[:20]
        assert header[:4] == b"\x7fELF" and int.from_bytes(header[18:20], "little") == ELF_MACHINE["aarch64"], name
        assert "x86_64" not in name
    assert read(archive, "pyvenv.cfg").decode().endswith("version = 3.12\n")


def test_the_archive_is_staged_beside_the_wheel(own_cache: Path) -> None:
    staged: list[str] = []

    def stage(files: object) -> dict[str, str]:
        names = [name for name, _path in files]  # type: ignore[attr-defined]
        staged.extend(names)
        return {name: f"https://stage/{name}" for name in names}

    agent = stage_agent(own_cache, stage, HOST)
    assert staged[:2] == [f"agent/{own_cache.name}", f"agent/{REQUIREMENTS_NAME}"]
    assert agent.runtime is not None and agent.runtime.url == f"https://stage/{staged[2]}"
    archive = build_agent_runtime(own_cache, HOST)
    assert agent.runtime.sha256 == hashlib.sha256(archive.read_bytes()).hexdigest()
    assert agent.runtime.target == HOST
    assert stage_agent(own_cache, stage, None).runtime is None


def test_an_archive_that_cannot_be_built_is_said_and_the_machines_make_the_venv(
    own_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("UV", "false")  # uv fails: offline with a cold cache, say
    said: list[str] = []
    agent = stage_agent(own_cache, lambda files: {name: name for name, _ in files}, HOST, said.append)
    assert agent.runtime is None and agent.wheel_url.endswith(".whl")
    (message,) = said
    assert "could not be built here" in message and "machines make it" in message and "\n" not in message
