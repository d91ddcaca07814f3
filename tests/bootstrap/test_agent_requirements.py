"""The agent's hashed requirements (rawvm.agent.requirements): exported from the real workspace lock (uv, no
network), every entry pinned with sha256 hashes, and installable as wheels only on the images' platforms."""

from __future__ import annotations

import tomllib
import zipfile
from pathlib import Path

import pytest
from packaging.tags import Tag, compatible_tags, cpython_tags
from packaging.utils import parse_wheel_filename
from rawvm.agent import requirements
from rawvm.agent.staged import stage_agent
from rawvm.agent.wheel import agent_source_dir
from rawvm.errors import RawvmError, UsageError

PYTHONS = ((3, 11), (3, 12))  # Debian 12 (qemu image) and Ubuntu 24.04 (EC2 images)
ARCHES = ("x86_64", "aarch64")
GLIBC_MINOR = 36  # the older image's glibc: Debian 12


def fake_wheel(path: Path, *requires: str) -> Path:
    metadata = "Metadata-Version: 2.3\nName: rawvm-agent\nVersion: 0.1.0\n"
    metadata += "".join(f"Requires-Dist: {r}\n" for r in requires)
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("rawvm_agent-0.1.0.dist-info/METADATA", metadata)
    return path


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> Path:
    project = agent_source_dir()
    assert project is not None
    out = tmp_path_factory.mktemp("req") / requirements.REQUIREMENTS_NAME
    requirements.export_locked(project, out)
    return out


def linux_tags(python: tuple[int, int], arch: str) -> set[Tag]:
    platforms = [f"manylinux_2_{m}_{arch}" for m in range(GLIBC_MINOR, 4, -1)]
    platforms += [f"manylinux2014_{arch}", f"linux_{arch}"]
    return set(cpython_tags(python, platforms=platforms)) | set(compatible_tags(python, platforms=platforms))


def test_every_dependency_of_the_agent_is_pinned_with_hashes(exported: Path) -> None:
    text = exported.read_text()
    entries = requirements.pinned(text)
    assert {"aiohttp", "msgpack", "psutil", "nvidia-ml-py"} <= set(entries)
    assert all(hashes and all(h.startswith("--hash=sha256:") for h in hashes) for hashes in entries.values())
    assert "rawvm" not in entries and "rawvm-agent" not in entries  # the wheel itself goes --no-deps


def test_the_lock_has_a_wheel_for_every_entry_on_every_image_platform(exported: Path) -> None:
    """The user-data installs with --only-binary :all: (no sdist, no unhashed build backend at boot): each
    pinned package must have a wheel for linux x86_64 and aarch64 on the images' Pythons, and its hash must be
    among the file's."""
    root = agent_source_dir()
    assert root is not None
    lock = tomllib.loads((root.parent / "uv.lock").read_text())
    entries = requirements.pinned(exported.read_text())
    for package in lock["package"]:
        name = requirements.normalize(package["name"])
        if name not in entries:
            continue
        wheels = [(w["url"].rsplit("/", 1)[1], w["hash"]) for w in package.get("wheels", [])]
        for python in PYTHONS:
            for arch in ARCHES:
                wanted = linux_tags(python, arch)
                fits = [h for filename, h in wheels if set(parse_wheel_filename(filename)[3]) & wanted]
                assert fits, f"{name}: no wheel for cp{python[0]}{python[1]} {arch}"
                assert any(f"--hash={h}" in entries[name] for h in fits), name


def test_an_unpinned_or_unhashed_entry_is_refused() -> None:
    assert requirements.pinned("a==1 \\\n    --hash=sha256:" + "0" * 64 + "\n") == {"a": ["--hash=sha256:" + "0" * 64]}
    with pytest.raises(RawvmError, match="not pinned"):
        requirements.pinned("a==1\n")
    with pytest.raises(RawvmError, match="not pinned"):
        requirements.pinned("a>=1 --hash=sha256:" + "0" * 64 + "\n")


def test_a_lock_missing_a_dependency_of_the_wheel_is_refused(tmp_path: Path) -> None:
    wheel = fake_wheel(tmp_path / "w.whl", "aiohttp>=3.9", "Msgpack>=1.0", "py-rattler>=0.20; extra == 'conda'")
    assert set(requirements.wheel_requirements(wheel)) == {"aiohttp", "msgpack"}
    reqs = tmp_path / "r.txt"
    reqs.write_text("aiohttp==3.9 --hash=sha256:" + "1" * 64 + "\nmsgpack==1.1 --hash=sha256:" + "2" * 64 + "\n")
    requirements.check(reqs, wheel)
    reqs.write_text("aiohttp==3.9 --hash=sha256:" + "1" * 64 + "\n")
    with pytest.raises(RawvmError, match="lack msgpack: run 'uv lock'"):
        requirements.check(reqs, wheel)


def test_the_wheel_is_staged_with_its_requirements(tmp_path: Path) -> None:
    wheel = fake_wheel(tmp_path / "rawvm_agent-0.1.0-py3-none-any.whl")
    staged: list[tuple[str, Path]] = []

    def stage(files: object) -> dict[str, str]:
        staged.extend(files)  # type: ignore[call-overload]
        return {name: f"https://stage/{name}" for name, _ in staged}

    with pytest.raises(UsageError, match=r"agent requirements .* not found"):
        stage_agent(wheel, stage)
    requirements.requirements_path(wheel).write_text("x==1 --hash=sha256:" + "0" * 64 + "\n")
    agent = stage_agent(wheel, stage)
    assert [name for name, _ in staged] == ["agent/rawvm_agent-0.1.0-py3-none-any.whl", "agent/agent-requirements.txt"]
    assert agent.requirements_url == "https://stage/agent/agent-requirements.txt"
    assert len(agent.requirements_sha256) == 64 and agent.requirements_sha256 != agent.wheel_sha256
