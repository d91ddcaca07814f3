"""A real local conda channel for the conda tests: tiny .tar.bz2 packages indexed by rattler's own indexer.

``build_demo_channel`` is imported by the resolver and agent conda tests. The channel holds:

- ``demo 1.0`` for linux-64 in two builds: ``cpu_0`` (down-weighted with a track feature, the way conda
  channels mark a CPU fallback) and ``cuda_0`` (depends on ``__cuda >=12``); and ``cpu_0`` for linux-aarch64;
- ``libdemo 1.2``, a noarch dependency of demo;
- ``newglibc 1.0`` for linux-64, which needs ``__glibc >=2.34``;
- ``python`` 3.11.8 and 3.12.2 for linux-64 (stand-ins: a file, no interpreter).

Every package installs ``share/<name>/flavour`` naming its build, so an install shows which build landed.
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import json
import tarfile
from dataclasses import dataclass, field
from pathlib import Path

import rattler


@dataclass(frozen=True)
class DemoPackage:
    subdir: str
    name: str
    version: str
    build: str
    depends: tuple[str, ...] = ()
    track_features: str = ""
    files: dict[str, bytes] = field(default_factory=dict)

    @property
    def filename(self) -> str:
        return f"{self.name}-{self.version}-{self.build}.tar.bz2"


DEMO_PACKAGES = (
    DemoPackage("linux-64", "demo", "1.0", "cpu_0", ("libdemo >=1",), track_features="demo-cpu"),
    DemoPackage("linux-64", "demo", "1.0", "cuda_0", ("libdemo >=1", "__cuda >=12")),
    DemoPackage("linux-aarch64", "demo", "1.0", "cpu_0", ("libdemo >=1",), track_features="demo-cpu"),
    DemoPackage("noarch", "libdemo", "1.2", "0"),
    DemoPackage("linux-64", "newglibc", "1.0", "0", ("__glibc >=2.34",)),
    DemoPackage("linux-64", "python", "3.11.8", "0"),
    DemoPackage("linux-64", "python", "3.12.2", "0"),
)


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mode = 0o644
    tar.addfile(info, io.BytesIO(data))


def write_package(channel: Path, package: DemoPackage) -> Path:
    """A conda package archive (.tar.bz2: info/index.json, info/paths.json, info/files, the payload)."""
    files = package.files or {f"share/{package.name}/flavour": f"{package.build}\n".encode()}
    index: dict[str, object] = {
        "name": package.name,
        "version": package.version,
        "build": package.build,
        "build_number": 0,
        "depends": list(package.depends),
        "subdir": package.subdir,
        "license": "MIT",
        "timestamp": 1_700_000_000_000,
    }
    if package.subdir == "noarch":
        index["noarch"] = "generic"
    else:
        arch = package.subdir.split("-")[1]
        index["platform"] = "linux"
        index["arch"] = {"64": "x86_64"}.get(arch, arch)
    if package.track_features:
        index["track_features"] = package.track_features
    paths = [
        {"_path": path, "path_type": "hardlink", "sha256": hashlib.sha256(data).hexdigest(), "size_in_bytes": len(data)}
        for path, data in sorted(files.items())
    ]
    out = channel / package.subdir / package.filename
    out.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(out, "w:bz2") as tar:
        _add(tar, "info/index.json", json.dumps(index, sort_keys=True).encode())
        _add(tar, "info/paths.json", json.dumps({"paths": paths, "paths_version": 1}).encode())
        _add(tar, "info/files", "".join(f"{path}\n" for path in sorted(files)).encode())
        for path, data in sorted(files.items()):
            _add(tar, path, data)
    return out


def index_channel(channel: Path) -> None:
    (channel / "noarch").mkdir(parents=True, exist_ok=True)  # a channel always has noarch
    asyncio.run(rattler.index.index_fs(channel, write_zst=False, write_shards=False, force=True))


def build_demo_channel(channel: Path) -> Path:
    for package in DEMO_PACKAGES:
        write_package(channel, package)
    index_channel(channel)
    return channel


def test_channel_is_indexed_with_both_demo_builds(tmp_path: Path) -> None:
    channel = build_demo_channel(tmp_path / "channel")
    linux64 = json.loads((channel / "linux-64" / "repodata.json").read_text())["packages"]
    assert sorted(record["build"] for record in linux64.values() if record["name"] == "demo") == ["cpu_0", "cuda_0"]
    assert linux64["demo-1.0-cuda_0.tar.bz2"]["depends"] == ["libdemo >=1", "__cuda >=12"]
    assert linux64["demo-1.0-cpu_0.tar.bz2"]["track_features"] == "demo-cpu"
    noarch = json.loads((channel / "noarch" / "repodata.json").read_text())["packages"]
    assert list(noarch) == ["libdemo-1.2-0.tar.bz2"]
    aarch64 = json.loads((channel / "linux-aarch64" / "repodata.json").read_text())["packages"]
    assert list(aarch64) == ["demo-1.0-cpu_0.tar.bz2"]
