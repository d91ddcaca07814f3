"""The rawvm-agent wheel: built for real with uv from the workspace source, and re-packed from an install."""

from __future__ import annotations

import subprocess
import zipfile
from importlib import metadata
from pathlib import Path

import pytest
from rawvm.agent import wheel as agent_wheel
from rawvm.agent.requirements import requirements_path


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    path = tmp_path / "cache"
    monkeypatch.setenv("RAWVM_CACHE_DIR", str(path))
    return path


def test_the_workspace_source_is_found() -> None:
    project = agent_wheel.agent_source_dir()
    assert project is not None
    assert (project / "rawvm_agent" / "config.py").is_file()


@pytest.mark.network  # uv fetches the build backend (hatchling) when its cache is cold
def test_same_source_gives_the_same_bytes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RAWVM_CACHE_DIR", str(tmp_path / "c1"))
    first = agent_wheel.build_agent_wheel().read_bytes()
    monkeypatch.setenv("RAWVM_CACHE_DIR", str(tmp_path / "c2"))  # a cold cache: a second real build
    second = agent_wheel.build_agent_wheel().read_bytes()
    assert first == second
    with zipfile.ZipFile(agent_wheel.build_agent_wheel()) as zf:
        names = zf.namelist()
        assert "rawvm_agent/config.py" in names
        assert {i.date_time for i in zf.infolist()} == {(1980, 1, 1, 0, 0, 0)}


@pytest.mark.network
def test_the_cache_is_keyed_by_the_source(tmp_path: Path, cache: Path) -> None:
    wheel = agent_wheel.build_agent_wheel(out_dir=tmp_path / "out")
    assert wheel.parent == tmp_path / "out"
    slots = list((cache / "agent-wheels").iterdir())
    assert len(slots) == 1
    project = agent_wheel.agent_source_dir()
    assert project is not None
    assert slots[0].name == f"src-{agent_wheel.source_hash(project)}"
    again = agent_wheel.build_agent_wheel()
    assert again.parent == slots[0]  # served from the cache, no second slot
    assert again.read_bytes() == wheel.read_bytes()
    # The hashed requirements are cached and copied beside the wheel.
    beside = requirements_path(again).read_text()
    assert requirements_path(wheel).read_text() == beside and "--hash=sha256:" in beside


def test_source_hash_changes_with_any_source_file(tmp_path: Path) -> None:
    project = tmp_path / "agent"
    (project / "rawvm_agent" / "__pycache__").mkdir(parents=True)
    (project / "pyproject.toml").write_text("[project]\nname = 'rawvm-agent'\n")
    (project / "rawvm_agent" / "a.py").write_text("A = 1\n")
    before = agent_wheel.source_hash(project)
    (project / "rawvm_agent" / "__pycache__" / "a.cpython-311.pyc").write_bytes(b"\0")
    assert agent_wheel.source_hash(project) == before  # bytecode is not source
    (project / "rawvm_agent" / "a.py").write_text("A = 2\n")
    assert agent_wheel.source_hash(project) != before


@pytest.mark.network
def test_an_installed_agent_is_repacked_from_its_record(tmp_path: Path, cache: Path) -> None:
    built = agent_wheel.build_agent_wheel()
    site = tmp_path / "site"
    subprocess.run(
        ["uv", "pip", "install", "--quiet", "--offline", "--no-deps", "--target", str(site), str(built)], check=True
    )
    (dist,) = [d for d in metadata.distributions(path=[str(site)]) if d.metadata["Name"] == "rawvm-agent"]
    repacked = agent_wheel.repack_installed(dist, tmp_path)
    with zipfile.ZipFile(built) as a, zipfile.ZipFile(repacked) as b:
        original = {n: a.read(n) for n in a.namelist() if not n.endswith(("RECORD", "WHEEL"))}
        again = {n: b.read(n) for n in b.namelist() if not n.endswith(("RECORD", "WHEEL"))}
        assert again == original
        assert b"Tag: py3-none-any" in b.read("rawvm_agent-0.1.0.dist-info/WHEEL")
    # and the re-packed wheel installs and imports
    site2 = tmp_path / "site2"
    subprocess.run(
        ["uv", "pip", "install", "--quiet", "--offline", "--no-deps", "--target", str(site2), str(repacked)], check=True
    )
    out = subprocess.run(
        ["python3", "-c", "import rawvm_agent.durations as d; print(d.parse_duration('20m'))"],
        env={"PYTHONPATH": str(site2)},
        capture_output=True,
        text=True,
        check=True,
    )
    assert out.stdout.strip() == "1200.0"
    again_dir = tmp_path / "again"
    again_dir.mkdir()
    assert agent_wheel.repack_installed(dist, again_dir).read_bytes() == repacked.read_bytes()  # reproducible
