"""An environment.yml with conda and pip parts locks into one bundle: pylock.toml from uv, conda-lock.yml from
rattler (the conda helper's module), both in the manifest. The channel is a real local file:// channel."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest
import rattler
from rawvm.cli import main

from tests.resolver.test_conda_channel import build_demo_channel

pytestmark = [pytest.mark.network]


def test_environment_yml_gives_pylock_and_conda_lock(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    channel = build_demo_channel(tmp_path / "channel")
    (tmp_path / "environment.yml").write_text(
        f"name: demo\nchannels:\n  - {channel.as_uri()}\ndependencies:\n  - python=3.11.8\n  - demo\n"
        "  - pip:\n    - six==1.17.0\n"
    )
    out = tmp_path / "bundle"
    code = main(["lock", "--from", str(tmp_path / "environment.yml"), "--cuda", "--json", "-o", str(out)])
    assert code == 0, capsys.readouterr().err
    manifest = tomllib.loads((out / "rawvm-env.toml").read_text())
    assert manifest["target"]["python"] == "3.11"  # from the python=3.11.8 spec
    kinds = {entry["path"]: entry["kind"] for entry in manifest["files"]}
    assert kinds["conda-lock.yml"] == "conda-lock"
    packages = {p["name"]: p for p in tomllib.loads((out / "pylock.toml").read_text())["packages"]}
    assert packages["six"]["version"] == "1.17.0"
    lock = rattler.LockFile.from_path(out / "conda-lock.yml")
    environment = lock.default_environment()
    assert environment is not None
    records = environment.conda_repodata_records()["linux-64"]
    names = {record.name.normalized: str(record.build) for record in records}
    assert names["demo"] == "cuda_0"  # the CUDA target gets the cuda build

    assert main(["export", str(out), "--format", "conda-lock", "-o", str(tmp_path / "exported.yml")]) == 0
    assert (tmp_path / "exported.yml").read_bytes() == (out / "conda-lock.yml").read_bytes()


def test_conda_channel_flag_overrides_the_environment_channels(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """environment.yml names a channel that does not exist; --conda-channel points at the real one."""
    channel = build_demo_channel(tmp_path / "channel")
    (tmp_path / "environment.yml").write_text(
        f"name: demo\nchannels:\n  - {(tmp_path / 'missing-channel').as_uri()}\ndependencies:\n"
        "  - python=3.11.8\n  - demo\n  - pip:\n    - six==1.17.0\n"
    )
    out = tmp_path / "bundle"
    argv = ["lock", "--from", str(tmp_path / "environment.yml"), "--json", "-o", str(out)]
    assert main(argv) == 1  # the environment's own channel cannot be read
    assert "channel" in capsys.readouterr().err
    assert main([*argv, "--conda-channel", channel.as_uri()]) == 0, capsys.readouterr().err
    records = rattler.LockFile.from_path(out / "conda-lock.yml").default_environment()
    assert records is not None
    names = {r.name.normalized: str(r.build) for r in records.conda_repodata_records()["linux-64"]}
    assert names["demo"] == "cpu_0"  # a CPU target gets the cpu build
