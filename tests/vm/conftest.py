"""Fixtures for the real-VM tests (marker ``vm``): the cached Debian image, the agent wheel, a qemu provider
whose clusters are torn down after each test, whatever happened."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from rawvm.agent.wheel import build_agent_wheel
from rawvm.providers.qemu import QemuProvider
from rawvm_images.local_vm import LocalImage, ensure_image

from tests.systools import need_vm_tools


@pytest.fixture(scope="session")
def vm_image() -> LocalImage:
    need_vm_tools()
    # Built once per machine into ~/.cache/rawvm/images (or $RAWVM_CACHE/images): minutes the first time.
    return ensure_image(progress=lambda msg: print(f"[image] {msg}", flush=True))


@pytest.fixture(scope="session")
def agent_wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_agent_wheel(tmp_path_factory.mktemp("agent-wheel"))


@pytest.fixture
def qemu_provider(tmp_path: Path, vm_image: LocalImage) -> Iterator[QemuProvider]:
    provider = QemuProvider(tmp_path / "state", progress=lambda msg: print(f"[qemu] {msg}", flush=True))
    yield provider
    for cluster_dir in sorted((tmp_path / "state" / "qemu").glob("*")):
        provider.down(cluster_dir.name)
    assert not [m for m in provider.list() if m.state == "running"]
