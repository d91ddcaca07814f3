"""Which releases have an artifact for the target, and the uv command line. Offline: file names only."""

from __future__ import annotations

from pathlib import Path

from rawvm_resolver.availability import (
    IndexFile,
    artifact_kind,
    nearest_version,
    parse_filename,
    platforms_offered,
)
from rawvm_resolver.compile import CompileInputs, uv_compile_command
from rawvm_resolver.platforms import describe_platform, dominant_platform, linux_platform_tags, target_tags
from rawvm_resolver.rules import TORCH_CPU_INDEX
from rawvm_resolver.target import Target

X86_311 = target_tags("3.11", "x86_64", "2.28")


def files(*names: str) -> list[IndexFile]:
    parsed = [parse_filename(name) for name in names]
    return [file for file in parsed if file is not None]


MLX = files(
    "mlx-0.21.0-cp311-cp311-macosx_14_0_arm64.whl",
    "mlx-0.25.2-cp311-cp311-manylinux_2_31_x86_64.whl",
    "mlx-0.29.4-cp311-cp311-manylinux_2_35_x86_64.whl",
    "mlx-0.30.0-cp311-cp311-manylinux_2_35_aarch64.whl",
    "mlx-0.30.0-cp311-cp311-manylinux_2_35_x86_64.whl",
    "mlx-0.31.0rc1-cp311-cp311-manylinux_2_17_x86_64.whl",
)


def test_manylinux_tags_follow_the_glibc_level() -> None:
    tags = linux_platform_tags("x86_64", "2.28")
    assert tags[0] == "manylinux_2_28_x86_64"
    assert "manylinux2014_x86_64" in tags and "manylinux1_x86_64" in tags
    assert "manylinux_2_31_x86_64" not in tags
    assert tags[-1] == "linux_x86_64"


def test_artifact_kind() -> None:
    assert artifact_kind(MLX, "0.21.0", X86_311) == ""  # macOS only
    assert artifact_kind(MLX, "0.29.4", X86_311) == ""  # needs glibc 2.35
    assert artifact_kind(MLX, "0.29.4", target_tags("3.11", "x86_64", "2.35")) == "wheel"
    assert artifact_kind(files("docopt-0.6.2.tar.gz"), "0.6.2", X86_311) == "sdist"
    assert artifact_kind(MLX, "0.25.2", target_tags("3.12", "x86_64", "2.35")) == ""  # no cp312 wheel


def test_nearest_prefers_the_next_newer_final_release() -> None:
    glibc_231 = target_tags("3.11", "x86_64", "2.31")
    assert nearest_version(MLX, "0.21.0", glibc_231) == "0.25.2"
    assert nearest_version(MLX, "0.29.4", target_tags("3.11", "aarch64", "2.35")) == "0.30.0"
    # Nothing newer works at glibc 2.31 (the rc is skipped): the newest older one.
    assert nearest_version(MLX, "0.29.4", glibc_231) == "0.25.2"
    assert nearest_version(MLX, "0.29.4", X86_311) == ""  # no release has a wheel for glibc 2.28


def test_platforms_offered_names_the_newest_release() -> None:
    metal = files("mlx_metal-0.29.4-py3-none-macosx_14_0_arm64.whl", "mlx_metal-0.29.4-py3-none-macosx_15_0_arm64.whl")
    assert platforms_offered(metal) == ["macosx_14_0_arm64", "macosx_15_0_arm64"]


def test_describe_and_dominant_platform() -> None:
    assert describe_platform("macosx_10_9_universal2") == ("macos", "arm64", "10.9")
    assert describe_platform("manylinux2014_aarch64") == ("linux", "aarch64", "2.17")
    tags = ["cp311-cp311-macosx_11_0_arm64", "cp311-cp311-macosx_14_0_arm64", "py3-none-any", "cp311-cp311-win_amd64"]
    assert dominant_platform(tags) == "macosx_14_0_arm64"
    assert dominant_platform(["py3-none-any"]) == ""


def test_uv_command_line(tmp_path: Path) -> None:
    target = Target(arch="aarch64", python="3.12", accelerator="cuda", cuda="12.8")
    inputs = CompileInputs(["torch"], ["torch==2.5.1"], target, [TORCH_CPU_INDEX])
    command = uv_compile_command(inputs, tmp_path / "r.in", tmp_path / "c.txt", tmp_path / "pylock.toml")
    assert command[1:4] == ["pip", "compile", str(tmp_path / "r.in")]
    joined = " ".join(command)
    assert "--python-platform aarch64-manylinux_2_28 --python-version 3.12" in joined
    assert f"--constraint {tmp_path / 'c.txt'}" in joined
    assert "--format pylock.toml" in joined
    assert f"--extra-index-url {TORCH_CPU_INDEX} --index-strategy unsafe-best-match" in joined
