"""conda list --export / --explicit files as inputs, the kept conda→PyPI name mapping, and --pypi-only's pure
parts, on small inline inputs (no network)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from rawvm_resolver.conda.conda_only import conda_only_reason, named_exactly
from rawvm_resolver.conda.inputs import read_environment_yml
from rawvm_resolver.conda.lists import EXPLICIT, EXPORT, conda_list_kind, read_conda_list
from rawvm_resolver.conda.pypi_names import build_data, choose, pypi_name, write_data
from rawvm_resolver.conda.pypi_only import Conversion, annotate, read_spec
from rawvm_resolver.environment import Environment, SourcePlatform
from rawvm_resolver.errors import InputError
from rawvm_resolver.report import ReportRow
from rawvm_resolver.scan import scan
from rawvm_resolver.target import Target

EXPORT_TEXT = """# This file may be used to create an environment using:
# $ conda create --name <env> --file <this file>
# platform: osx-arm64
bzip2=1.0.8=h93a5062_5
certifi=2024.2.2=pypi_0
libcxx=16.0.6=h4653b0c_0
numpy=1.26.4=pypi_0
python=3.12.3=h4a7b5fc_0_cpython
scikit-learn=1.4.1.post1=py312h1234_0
mypkg=0.1.0=dev_0
scipy=1.13.1
"""

EXPLICIT_TEXT = """# platform: osx-64
@EXPLICIT
https://repo.anaconda.com/pkgs/main/osx-64/python-3.7.0-hc167b69_0.tar.bz2
https://conda.anaconda.org/pytorch/osx-64/pytorch-0.4.1-py37_cuda0.0_cudnn0.0_1.tar.bz2
https://repo.anaconda.com/pkgs/main/osx-64/numpy-1.15.1-py37h6a91979_0.tar.bz2
https://repo.anaconda.com/pkgs/main/noarch/tzdata-2023c-h04d1e81_0.conda#abc
https://repo.anaconda.com/pkgs/main/osx-64/libcxx-4.0.1-h579ed51_0.tar.bz2
"""


def write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_kind_is_told_by_content_not_by_name(tmp_path: Path) -> None:
    assert conda_list_kind(write(tmp_path, "requirements.txt", EXPORT_TEXT)) == EXPORT
    assert conda_list_kind(write(tmp_path, "spec", EXPLICIT_TEXT)) == EXPLICIT
    headless = "\n".join(line for line in EXPORT_TEXT.splitlines()[3:] if line.count("=") == 2)
    assert conda_list_kind(write(tmp_path, "list.txt", headless)) == EXPORT  # every line name=version=build
    assert conda_list_kind(write(tmp_path, "pins.txt", "numpy==1.26.4\nrequests>=2\n")) is None
    assert conda_list_kind(write(tmp_path, "mixed.txt", "numpy=1.26.4=py311_0\nrequests==2.31.0\n")) is None


def test_export_pip_builds_go_to_pypi_and_conda_pins_lose_their_builds(tmp_path: Path) -> None:
    conda = read_conda_list(write(tmp_path, "export.txt", EXPORT_TEXT))
    assert conda.subdir == "osx-arm64"
    assert conda.pip_requirements == ("certifi==2024.2.2", "numpy==1.26.4", "mypkg==0.1.0")
    assert conda.specs == ("bzip2 ==1.0.8", "python ==3.12.3", "scikit-learn ==1.4.1.post1", "scipy=1.13.1")
    assert [(name, version) for name, version, _ in conda.dropped] == [("libcxx", "16.0.6")]
    assert "macOS C++ runtime" in conda.dropped[0][2]
    assert conda.channels == ()  # an export names none: the lock's default channel


def test_explicit_urls_give_pins_channels_by_use_and_the_subdir(tmp_path: Path) -> None:
    conda = read_conda_list(write(tmp_path, "spec.txt", EXPLICIT_TEXT))
    assert conda.subdir == "osx-64"
    assert conda.specs == ("python ==3.7.0", "pytorch ==0.4.1", "numpy ==1.15.1", "tzdata ==2023c")
    assert conda.channels == ("https://repo.anaconda.com/pkgs/main", "pytorch")
    assert [name for name, _, _ in conda.dropped] == ["libcxx"]


def test_explicit_line_that_is_no_package_url_is_one_clear_error(tmp_path: Path) -> None:
    path = write(tmp_path, "spec.txt", "@EXPLICIT\nnumpy=1.26\n")
    with pytest.raises(InputError, match=r"spec.txt:2: 'numpy=1.26' is no conda package URL"):
        read_conda_list(path)


def test_scan_reads_a_conda_export_named_requirements_txt_as_a_conda_environment(tmp_path: Path) -> None:
    env = scan(write(tmp_path, "requirements.txt", EXPORT_TEXT))
    assert env.kind == "conda"
    assert (env.platform.python, env.platform.os, env.platform.arch) == ("3.12.3", "macos", "arm64")
    assert {dist.name: dist.version for dist in env.distributions} == {
        "certifi": "2024.2.2",
        "numpy": "1.26.4",
        "mypkg": "0.1.0",
    }


def test_environment_yml_records_macos_only_drops_and_its_mac_origin(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "environment.yml",
        "name: x\ndependencies:\n  - libcxx=14.0.6=h848a8c0_0\n  - numpy=1.26.4=py311he598dae_0\n"
        "prefix: /Users/me/miniforge3/envs/x\n",
    )
    conda = read_environment_yml(path)
    assert conda.specs == ("numpy ==1.26.4",)
    assert [(name, version) for name, version, _ in conda.dropped] == [("libcxx", "14.0.6")]
    assert conda.subdir == "osx"


def test_name_mapping_is_the_kept_data() -> None:
    assert pypi_name("pytorch").pypi == "torch"
    assert pypi_name("msgpack-python").pypi == "msgpack"
    assert pypi_name("python-tzdata").pypi == "tzdata"
    assert pypi_name("typing_extensions").pypi == "typing-extensions"
    assert pypi_name("brotli-python").pypi == "brotli"  # rawvm's additions
    assert not pypi_name("no-such-conda-package-xyz").known


def test_choose_prefers_the_unaffixed_name_then_the_own_name() -> None:
    assert choose("msgpack-python", ["msgpack", "msgpack-python"]) == "msgpack"
    assert choose("ansible", ["ansible", "ansible-base", "pip"]) == "ansible"
    assert choose("arm_pyart", ["appdirs", "arm-pyart"]) == "arm-pyart"
    assert choose("x", None) is None


def test_refresh_reads_both_formats_and_round_trips(tmp_path: Path) -> None:
    grayskull = {"torch": {"pypi_name": "torch", "conda_name": "pytorch"}, "ab" * 30: {"conda_name": "junk"}}
    parselmouth = {"libcxx": None, "pytorch": ["ignored"], "numpy": ["numpy"]}
    data = build_data([grayskull, parselmouth], "test")
    assert data["names"] == {"libcxx": None, "numpy": "numpy", "pytorch": "torch"}  # first wins; hashes skipped
    path = tmp_path / "names.json"
    write_data(data, path)
    assert json.loads(path.read_text()) == data


@pytest.mark.parametrize(
    ("spec", "version", "specifier"),
    [
        ("numpy ==1.26.4", "1.26.4", ""),
        ("numpy=1.2", "", "==1.2.*"),
        ("numpy>=1.2,<2", "", "<2,>=1.2"),
        ("numpy", "", ""),
        ("numpy 1.2|1.3", "", ""),
    ],
)
def test_conda_specs_become_pep440(spec: str, version: str, specifier: str) -> None:
    package = read_spec(spec)
    assert (package.version, package.spec) == (version, specifier)


@pytest.mark.parametrize(
    ("name", "reason"),
    [
        ("python", "the interpreter itself: the VM's venv brings Python 3.11"),
        ("openssl", "C library"),
        ("clang_osx-arm64", "compiler toolchain"),
        ("cudatoolkit", "CUDA toolkit (PyPI's nvidia-* wheels bring CUDA)"),
    ],
)
def test_conda_only_packages_have_a_reason(name: str, reason: str) -> None:
    assert conda_only_reason(name, Target(arch="x86_64", python="3.11")) == reason
    assert conda_only_reason("numpy", Target(arch="x86_64", python="3.11")) is None


def test_broad_conda_only_patterns_leave_room_for_python_packages() -> None:
    # libsass and qtconsole are Python packages the mapping lacks: a glob alone does not drop them, PyPI
    # having their very version decides (checked in to_pypi); names listed exactly are always conda-only.
    assert named_exactly("openssl") and named_exactly("python")
    assert not named_exactly("libsass") and not named_exactly("qtconsole")
    assert conda_only_reason("libsass", Target(arch="x86_64", python="3.11")) == "C library"


def test_annotate_names_rows_by_their_conda_origin() -> None:
    env = Environment(origin="x", kind="conda", platform=SourcePlatform(python="3.11", platform=""))
    conversion = Conversion(
        environment=env,
        rows={"libcxx": ReportRow("libcxx", "dropped", "16.0.6", "", "macOS-only conda package: …")},
        origins={"torch": ("pytorch", "2.1.0"), "numpy": ("numpy", "1.26.0")},
        notes={"numpy": "PyPI has no 1.26.0 for linux-x86_64 (Python 3.11): nearest release with one"},
    )
    rows = annotate(
        [
            ReportRow("torch", "translated", "2.1.0", "2.1.0", "PyPI's linux-x86_64 wheel"),
            ReportRow("numpy", "version-changed", "1.26.1", "1.26.1", "uv chose another version"),
            ReportRow("six", "kept", "1.16.0", "1.16.0", "same version"),
        ],
        conversion,
    )
    by_name = {row.name: row for row in rows}
    assert by_name["pytorch"].target == "torch 2.1.0"
    assert "conda package pytorch is PyPI's torch" in by_name["pytorch"].reason
    assert by_name["numpy"].action == "version-changed"
    assert "nearest release" in by_name["numpy"].reason
    assert by_name["six"].action == "kept"
    assert by_name["libcxx"].action == "dropped"
