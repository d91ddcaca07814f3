"""read_environment_yml on a realistic macOS export, and scan_conda_prefix on prefixes laid out on disk."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
from rawvm_resolver.conda import CondaInput, read_environment_yml, scan_conda_prefix
from rawvm_resolver.errors import InputError

# `conda env export` of a data-science env on an M-series Mac (conda-forge), trimmed but in the real shape.
MACOS_EXPORT = """\
name: ds
channels:
  - conda-forge
  - nodefaults
dependencies:
  - appnope=0.1.4=pyhd8ed1ab_0
  - bzip2=1.0.8=h93a5062_5
  - ca-certificates=2024.2.2=hf0a4a13_0
  - libblas=3.9.0=21_osxarm64_openblas
  - libcxx=16.0.6=h4653b0c_0
  - libgfortran=5.0.0=13_2_0_hd922786_3
  - libgfortran5=13.2.0=hf226fd6_3
  - libopenblas=0.3.26=openmp_h6c19121_0
  - llvm-openmp=18.1.2=hcd81f8e_0
  - numpy=1.26.4=py311h7125741_0
  - openssl=3.2.1=h0d3ecfb_1
  - pandas=2.2.1=py311hfbe21a1_0
  - pip=24.0=pyhd8ed1ab_0
  - python=3.11.8=hdf0ec26_0_cpython
  - python_abi=3.11=4_cp311
  - scikit-learn=1.4.1.post1=py311h696ec7d_0
  - pip:
      - rich==13.7.1
      - torch==2.2.2
      - -e ./src/mypkg
prefix: /Users/ana/miniforge3/envs/ds
"""


def test_macos_export_keeps_versions_drops_builds_and_macos_runtimes(tmp_path: Path) -> None:
    path = tmp_path / "environment.yml"
    path.write_text(MACOS_EXPORT)
    conda = read_environment_yml(path)
    assert conda.subdir == "osx-arm64"  # the builds say where it came from
    dropped = [(name, version) for name, version, _ in conda.dropped]
    assert dropped == [
        ("appnope", "0.1.4"),
        ("libcxx", "16.0.6"),
        ("libgfortran", "5.0.0"),
        ("libgfortran5", "13.2.0"),
        ("llvm-openmp", "18.1.2"),
    ]
    assert dataclasses.replace(conda, subdir="", dropped=()) == CondaInput(
        channels=("conda-forge",),
        specs=(
            "bzip2 ==1.0.8",
            "ca-certificates ==2024.2.2",
            "libblas ==3.9.0",
            "libopenblas ==0.3.26",
            "numpy ==1.26.4",
            "openssl ==3.2.1",
            "pandas ==2.2.1",
            "pip ==24.0",
            "python ==3.11.8",
            "python_abi ==3.11",
            "scikit-learn ==1.4.1.post1",
        ),
        pip_requirements=("rich==13.7.1", "torch==2.2.2", "-e ./src/mypkg"),
    )


def test_from_history_export_is_kept_as_written(tmp_path: Path) -> None:
    path = tmp_path / "environment.yml"
    path.write_text("channels: [pytorch, defaults]\ndependencies:\n  - python=3.11\n  - pytorch::pytorch>=2.2\n")
    conda = read_environment_yml(path)
    assert conda.channels == ("pytorch", "https://repo.anaconda.com/pkgs/main", "https://repo.anaconda.com/pkgs/r")
    assert conda.specs == ("python=3.11", "pytorch::pytorch>=2.2")
    assert conda.pip_requirements == ()


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("dependencies: [numpy\n", r"invalid YAML at line \d+"),
        ("- numpy\n", "is no environment.yml"),
        ("dependencies:\n  - {conda: numpy}\n", "unexpected dependency entry"),
        ("channels: conda-forge\ndependencies: [numpy]\n", "'channels' must be a list of strings"),
        ("dependencies:\n  - numpy ===<<>\n", "invalid conda spec"),
    ],
)
def test_bad_environment_yml_is_one_clear_line(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "environment.yml"
    path.write_text(text)
    with pytest.raises(InputError, match=message) as info:
        read_environment_yml(path)
    assert "\n" not in str(info.value)


def test_missing_environment_yml(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="cannot read"):
        read_environment_yml(tmp_path / "nope.yml")


def _record(meta: Path, name: str, version: str, build: str, channel: str, **extra: object) -> None:
    subdir = channel.rsplit("/", 1)[-1] if "/" in channel else "osx-arm64"
    record = {
        "name": name,
        "version": version,
        "build": build,
        "build_number": 0,
        "channel": channel,
        "subdir": subdir,
        "url": f"{channel}/{name}-{version}-{build}.conda",
        "depends": [],
        "files": [],
        **extra,
    }
    (meta / f"{name}-{version}-{build}.json").write_text(json.dumps(record))


@pytest.fixture
def macos_prefix(tmp_path: Path) -> Path:
    """A conda prefix as conda lays it out on an M-series Mac: conda-meta records plus a history."""
    prefix = tmp_path / "envs" / "ds"
    meta = prefix / "conda-meta"
    meta.mkdir(parents=True)
    forge = "https://conda.anaconda.org/conda-forge/osx-arm64"
    _record(meta, "python", "3.11.8", "hdf0ec26_0_cpython", forge)
    _record(meta, "numpy", "1.26.4", "py311h7125741_0", forge)
    _record(meta, "libcxx", "16.0.6", "h4653b0c_0", forge)
    _record(meta, "pytorch", "2.2.2", "py3.11_0", "https://conda.anaconda.org/pytorch/osx-arm64")
    _record(meta, "tzdata", "2024a", "h0c530f3_0", "https://conda.anaconda.org/conda-forge/noarch")
    (meta / "history").write_text(
        "==> 2024-03-01 10:00:00 <==\n"
        "# cmd: /Users/ana/miniforge3/bin/conda create -n ds python=3.11 numpy=1.26.4=py311h7125741_0 matplotlib\n"
        "+conda-forge/osx-arm64::python-3.11.8-hdf0ec26_0_cpython\n"
        "# update specs: ['python=3.11', 'numpy=1.26.4=py311h7125741_0', 'matplotlib']\n"
        "==> 2024-03-02 10:00:00 <==\n"
        "# remove specs: ['matplotlib']\n"
        "==> 2024-03-03 10:00:00 <==\n"
        "# update specs: ['pytorch::pytorch']\n"
    )
    return prefix


def test_prefix_with_history_gives_the_requested_specs(macos_prefix: Path) -> None:
    conda = scan_conda_prefix(macos_prefix)
    assert conda.specs == ("python=3.11", "numpy ==1.26.4", "pytorch::pytorch")
    assert conda.channels == ("conda-forge", "pytorch")  # most packages first
    assert conda.pip_requirements == ()


def test_prefix_without_history_pins_every_package(macos_prefix: Path) -> None:
    (macos_prefix / "conda-meta" / "history").unlink()
    conda = scan_conda_prefix(macos_prefix)
    # libcxx is macOS's C++ runtime: left to the Linux solve.
    assert conda.specs == ("numpy ==1.26.4", "python ==3.11.8", "pytorch ==2.2.2", "tzdata ==2024a")


def test_prefix_made_by_rattler_uses_the_records_requested_specs(tmp_path: Path) -> None:
    meta = tmp_path / "env" / "conda-meta"
    meta.mkdir(parents=True)
    (meta / "history").write_text("// not relevant for pixi but for `conda run -p`\n")
    _record(
        meta, "python", "3.12.2", "h0", "https://conda.anaconda.org/conda-forge/", requested_specs=["python 3.12.*"]
    )
    _record(meta, "bzip2", "1.0.8", "h1", "https://conda.anaconda.org/conda-forge/", requested_specs=[])
    conda = scan_conda_prefix(tmp_path / "env")
    assert conda.specs == ("python 3.12.*",)
    assert conda.channels == ("conda-forge",)


def _dist_info(prefix: Path, name: str, version: str, direct_url: dict[str, object] | None = None) -> str:
    dist_info = prefix / "lib" / "python3.11" / "site-packages" / f"{name}-{version}.dist-info"
    dist_info.mkdir(parents=True)
    (dist_info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n\nA package.\n")
    (dist_info / "INSTALLER").write_text("pip\n")
    if direct_url is not None:
        (dist_info / "direct_url.json").write_text(json.dumps(direct_url))
    return f"lib/python3.11/site-packages/{name}-{version}.dist-info/METADATA"


def test_prefix_pip_section_is_what_no_conda_record_owns(tmp_path: Path) -> None:
    prefix = tmp_path / "env"
    meta = prefix / "conda-meta"
    meta.mkdir(parents=True)
    numpy_metadata = _dist_info(prefix, "numpy", "1.26.4")
    _record(meta, "numpy", "1.26.4", "py311h7125741_0", "conda-forge", files=[numpy_metadata])
    _dist_info(prefix, "rich", "13.7.1")
    _dist_info(prefix, "mypkg", "0.1", {"url": "file:///Users/ana/src/my%20pkg", "dir_info": {"editable": True}})
    _dist_info(
        prefix, "tool", "2.0",
        {"url": "https://github.com/ana/tool", "vcs_info": {"vcs": "git", "commit_id": "0123abcd"}},
    )  # fmt: skip
    wheel_url = "https://example.org/wheelie-1.0-py3-none-any.whl"
    _dist_info(prefix, "wheelie", "1.0", {"url": wheel_url, "archive_info": {}})
    conda = scan_conda_prefix(prefix)
    assert conda.specs == ("numpy ==1.26.4",)
    assert conda.pip_requirements == (
        "-e '/Users/ana/src/my pkg'",
        "rich==13.7.1",
        "tool @ git+https://github.com/ana/tool@0123abcd",
        f"wheelie @ {wheel_url}",
    )


def test_prefix_errors(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="no conda-meta"):
        scan_conda_prefix(tmp_path)
    (tmp_path / "conda-meta").mkdir()
    with pytest.raises(InputError, match="empty conda environment"):
        scan_conda_prefix(tmp_path)
    (tmp_path / "conda-meta" / "broken-1-0.json").write_text("{")
    with pytest.raises(InputError, match="unreadable conda package record"):
        scan_conda_prefix(tmp_path)
