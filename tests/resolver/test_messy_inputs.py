"""Messy inputs, each on a small inline case: sources not on this machine, inconsistent pins, the glibc level.

Readers and translation run offline; the relaxation and glibc cases run real uv against PyPI (network).
"""

from __future__ import annotations

import argparse
import tomllib
from pathlib import Path

import pytest
from rawvm.cli.lock import PROVIDER_GLIBC, target_from_args
from rawvm_resolver import LockResult, Target, lock
from rawvm_resolver.environment import Distribution, Environment, Source, SourcePlatform
from rawvm_resolver.errors import InputError, ResolverError
from rawvm_resolver.follow import follow_moved_pins
from rawvm_resolver.relax import relaxation_order, required_ranges
from rawvm_resolver.report import ReportRow
from rawvm_resolver.sources import editable_pins, forge_archive, parse_requirement_lines, read_file_input, split_vcs_url
from rawvm_resolver.target import parse_glibc_version
from rawvm_resolver.translate import Plan, translate
from rawvm_resolver.unreachable import known_version, origin_of
from rawvm_resolver.uv_messages import build_cause

CPU = Target(arch="x86_64", python="3.11", glibc="2.39")
CROOT = (
    "numpy @ file:///private/var/folders/k1/30mswbxs7r1g6zwn8y4fyt500000gp/T/abs_f2amvjkczw/croot/"
    "numpy_and_numpy_base_1725470317860/work/dist/numpy-2.0.1-cp311-cp311-macosx_11_0_arm64.whl#sha256=6ec8"
)
POETRY = (
    "importlib-metadata @ file:///Users/y/Library/Caches/pypoetry/artifacts/58/de/f6/e8/"
    "importlib_metadata-4.8.1-py3-none-any.whl"
)
VCS = "-e git+ssh://git@github.com/psf/requests.git@0e322af87745eff34caffe4df68456ebc20d9068#egg=requests"


def _reqs(*lines: str) -> dict[str, Distribution]:
    return parse_requirement_lines(list(lines), Path("/nonexistent"))[0]


def _env(dists: dict[str, Distribution]) -> Environment:
    platform = SourcePlatform(python="3.11", platform="")
    return Environment("test", "requirements", platform, tuple(sorted(dists.values(), key=lambda d: d.name)))


# -- readers -------------------------------------------------------------------------------------------------


def test_croot_wheel_path_gives_name_and_version() -> None:
    dist = _reqs(CROOT)["numpy"]
    assert dist.source.kind == "archive" and dist.is_local
    assert known_version(dist) == ("2.0.1", "the wheel file name")
    assert origin_of(dist) == "conda-built package"


def test_croot_work_directory_has_no_version() -> None:
    dist = _reqs("attrs @ file:///tmp/build/80754af9/attrs_1620827162558/work")["attrs"]
    assert known_version(dist) == ("", "")
    assert origin_of(dist) == "conda-built package"
    # source: Haas-Lab/Label_Seg_Program requirements.txt (8722781ea4ac9e998e52a716e91f39d3055b48ed), one line
    forge = _reqs("Pygments @ file:///home/conda/feedstock_root/build_artifacts/pygments_1650904496387/work")
    assert origin_of(forge["pygments"]) == "conda-built package"  # conda-forge's build path


def test_poetry_and_pip_cache_wheels() -> None:
    dist = _reqs(POETRY)["importlib-metadata"]
    assert known_version(dist) == ("4.8.1", "the wheel file name") and origin_of(dist) == "poetry cache wheel"
    pip = _reqs("six @ file:///Users/a/Library/Caches/pip/wheels/c3/2a/six-1.16.0-py2.py3-none-any.whl")["six"]
    assert known_version(pip)[0] == "1.16.0" and origin_of(pip) == "pip cache wheel"


def test_editable_vcs_line_is_a_vcs_source_named_by_its_egg() -> None:
    dist = _reqs(VCS)["requests"]
    assert dist.source == Source(
        kind="vcs", url="git+ssh://git@github.com/psf/requests.git", commit="0e322af87745eff34caffe4df68456ebc20d9068"
    )


def test_vcs_url_split_keeps_the_user_at_host() -> None:
    assert split_vcs_url("git+ssh://git@github.com/o/r.git") == ("git+ssh://git@github.com/o/r.git", "")
    assert split_vcs_url("git+https://github.com/o/r.git@v1.2") == ("git+https://github.com/o/r.git", "v1.2")


def test_editable_path_not_here_takes_the_freeze_comment_version(tmp_path: Path) -> None:
    text = "# Editable install with no version control (mytool==0.3.0)\n-e /Users/someone/src/mytool\nsix==1.16.0\n"
    assert editable_pins(text) == {"mytool": "0.3.0"}
    (tmp_path / "requirements.txt").write_text(text)
    dists = read_file_input(tmp_path / "requirements.txt").by_name()
    assert dists["mytool"].source.kind == "editable" and dists["mytool"].version == "0.3.0"


def test_egg_fragment_with_version() -> None:
    dist = _reqs("-e git+https://github.com/wacul/diffbotpy.git@master#egg=diffbotpy-0.1")["diffbotpy"]
    assert known_version(dist) == ("0.1", "the version the source records")


# -- translation ---------------------------------------------------------------------------------------------


def test_sources_not_here_become_index_requirements_with_a_reason() -> None:
    plan = translate(_env(_reqs(CROOT, POETRY, VCS, "appnope @ file:///tmp/build/80754af9/appnope_1/work")), CPU)
    assert plan.local == []
    assert plan.requirement_lines() == ["importlib-metadata", "numpy", "requests"]
    assert plan.constraint_lines() == ["importlib-metadata==4.8.1", "numpy==2.0.1"]
    assert plan.rows["numpy"].action == "translated" and "wheel file name" in plan.rows["numpy"].reason
    assert "--keep-vcs" in plan.rows["requests"].reason
    assert plan.rows["appnope"].action == "dropped"  # the rules table still decides first
    assert set(plan.index_or_drop) == {"importlib-metadata", "numpy", "requests", "appnope"}


def test_keep_vcs_keeps_the_vcs_requirement() -> None:
    plan = translate(_env(_reqs(VCS)), CPU, keep_vcs=True)
    assert plan.requirement_lines() == [
        "requests @ git+ssh://git@github.com/psf/requests.git@0e322af87745eff34caffe4df68456ebc20d9068"
    ]
    assert plan.rows == {}


def test_a_directory_that_is_no_project_is_not_built(tmp_path: Path) -> None:
    dists = parse_requirement_lines(["-e ."], tmp_path)[0]
    plan = translate(_env(dists), CPU)
    assert plan.local == [] and list(plan.index_or_drop) == list(dists)


def test_relaxation_prefers_a_moved_pin_then_a_dependency() -> None:
    plan = Plan(constraints={"conan": "1.51.3", "jinja2": "2.11.3", "torch": "1.10.2", "torchvision": "0.9.0"})
    conan = "Because conan==1.51.3 depends on jinja2>=3.0,<4.0.0 and you require jinja2==2.11.3, unsatisfiable."
    assert relaxation_order(plan, conan) == ["jinja2", "conan"]
    plan.rows["torchvision"] = ReportRow("torchvision", "version-changed", "0.9.0a0", "0.9.0", "nearest")
    torch = "Because torchvision==0.9.0 depends on torch==1.8.0 and you require torch==1.10.2, unsatisfiable."
    assert relaxation_order(plan, torch) == ["torchvision", "torch"]


# -- the glibc level -------------------------------------------------------------------------------------------


def _args(**overrides: object) -> argparse.Namespace:
    values: dict[str, object] = {"platform": "linux-x86_64", "python": "", "cuda": None, "glibc": "", "provider": "aws"}
    return argparse.Namespace(**{**values, **overrides})


def test_default_glibc_is_the_providers_default_image() -> None:
    assert target_from_args(_args()).glibc == PROVIDER_GLIBC["aws"] == "2.39"
    assert target_from_args(_args(provider="qemu")).glibc == "2.36"
    assert target_from_args(_args(glibc="2.35")).glibc == "2.35"
    with pytest.raises(InputError):
        parse_glibc_version("2.5x")


# -- real uv (network) -----------------------------------------------------------------------------------------


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "requirements.txt"
    path.write_text(text)
    return path


def _lock_cpu(source: Path, tmp_path: Path) -> tuple[LockResult, dict[str, ReportRow]]:
    """``source`` locked for the CPU target into tmp_path / "bundle": (the result, its report rows by name)."""
    result = lock(source, CPU, tmp_path / "bundle", project_dir=tmp_path)
    return result, {row.name: row for row in result.rows}


@pytest.mark.network
def test_inconsistent_pins_relax_the_fewest_and_keep_the_rest(tmp_path: Path) -> None:
    source = _write(tmp_path, "conan==1.51.3\njinja2==2.11.3\nmarkupsafe==2.0.1\nsix==1.16.0\ncolorama==0.4.5\n")
    result, rows = _lock_cpu(source, tmp_path)
    assert rows["jinja2"].action == "version-changed" and rows["jinja2"].target.startswith("3.")
    assert rows["jinja2"].reason.startswith("the source environment was inconsistent: ")
    assert "conan" in rows["jinja2"].reason
    relaxed = [row.name for row in result.rows if "the source environment was inconsistent" in row.reason]
    assert relaxed == ["jinja2"], relaxed  # one pin relaxed: the fewest
    # markupsafe 2.0.1 has no Python 3.11 wheel: it moves for that, and says so, not for the conflict
    assert "its sdist is compiled code" in rows["markupsafe"].reason
    assert {rows[name].target for name in ("six", "colorama")} == {"1.16.0", "0.4.5"}
    assert result.relaxation_runs >= 1 and result.uv_runs > result.relaxation_runs


@pytest.mark.network
def test_strict_keeps_the_refusal(tmp_path: Path) -> None:
    source = _write(tmp_path, "conan==1.51.3\njinja2==2.11.3\n")
    with pytest.raises(ResolverError) as info:
        lock(source, CPU, tmp_path / "bundle", project_dir=tmp_path, strict=True)
    assert "\n" not in str(info.value) and "jinja2" in str(info.value)


@pytest.mark.network
def test_a_source_with_no_index_release_is_dropped_not_refused(tmp_path: Path) -> None:
    source = _write(tmp_path, "-e git+ssh://git@github.com/example/no-such-rawvm-pkg.git#egg=no-such-rawvm-pkg\nsix\n")
    result, rows = _lock_cpu(source, tmp_path)
    assert rows["no-such-rawvm-pkg"].action == "dropped" and "index has no release" in rows["no-such-rawvm-pkg"].reason
    assert rows["six"].target and any("no-such-rawvm-pkg" in warning for warning in result.warnings)


@pytest.mark.network
def test_mlx_locks_with_its_cpu_backend_at_the_default_image_glibc(tmp_path: Path) -> None:
    source = _write(tmp_path, "mlx==0.29.0\nmlx-metal==0.29.0\n")
    _, rows = _lock_cpu(source, tmp_path)
    assert rows["mlx"].target == "0.29.0" and rows["mlx-metal"].action == "dropped"
    assert rows["mlx-cpu"].target == "0.29.0"  # the library the Linux wheel needs
    # A lock of nothing but dropped rows is refused now (issue 23): six keeps the old-glibc lock non-empty.
    with_six = tmp_path / "with-six"
    with_six.mkdir()
    old_source = _write(with_six, "mlx==0.29.0\nmlx-metal==0.29.0\nsix==1.16.0\n")
    old = lock(old_source, Target(arch="x86_64", python="3.11", glibc="2.28"), tmp_path / "old", project_dir=tmp_path)
    assert {row.name: row for row in old.rows}["mlx"].action == "dropped"  # manylinux_2_35 wheels only


@pytest.mark.network
@pytest.mark.parametrize(
    ("name", "version", "because"),
    [
        # the index never had it: nb-conda comes from conda, yet a pip freeze inside the conda environment lists it
        pytest.param("nb-conda", "2.2.1", "", id="never-on-the-index"),
        # no release of it builds: suds-jurko (every release an sdist using setuptools' removed use_2to3), from
        # dvrk-dvys/EZ_RVC's freeze
        pytest.param("suds-jurko", "0.6", "use_2to3", id="no-release-builds"),
    ],
)
def test_a_pin_the_index_cannot_serve_is_dropped_with_a_warning(
    name: str, version: str, because: str, tmp_path: Path
) -> None:
    source = _write(tmp_path, f"{name}=={version}\nsix==1.16.0\n")
    _, rows = _lock_cpu(source, tmp_path)
    assert rows[name].action == "dropped" and rows[name].reason.startswith("WARNING: ")
    assert because in rows[name].reason and rows["six"].target == "1.16.0"
    with pytest.raises(ResolverError, match=name):
        lock(source, CPU, tmp_path / "strict", project_dir=tmp_path, strict=True)


# -- a moved pin takes its dependencies along; relaxation uses the range uv names ---------------------------------


def test_required_ranges_are_read_from_uvs_explanation() -> None:
    explanation = (
        "Because conan==1.51.3 depends on distro{sys_platform == 'linux' or sys_platform == 'linux2'}>=1.0.2,<=1.6.0 "
        "and you require distro==1.7.0, we can conclude ... Because conan==1.51.3 depends on jinja2>=3.0,<4.0.0 and "
        "torchvision==0.9.0 depends on torch==1.8.0. poetry==1.1.14 depends on packaging>=20.4,<21.0 and "
        "statsmodels==0.13.2 depends on packaging>=21.3"
    )
    assert required_ranges(explanation) == {"distro": ">=1.0.2,<=1.6.0", "jinja2": ">=3.0,<4.0.0", "torch": "==1.8.0"}
    # packaging is asked for in two ranges that do not meet: no single range to relax it to


def test_a_relaxed_pin_is_a_range_in_the_constraints() -> None:
    plan = Plan(constraints={"six": "1.16.0"}, ranges={"jinja2": ">=3.0,<4.0.0", "packaging": ">=20.9"})
    assert plan.constraint_lines() == ["jinja2>=3.0,<4.0.0", "packaging>=20.9", "six==1.16.0"]


def test_a_failed_builds_cause_is_its_last_line() -> None:
    stderr = (
        "error: Failed to build `gym==0.21.0`\n  cause: The build backend returned an error\n"
        "  cause: Call to `setuptools.build_meta:__legacy__.get_requires_for_build_wheel` failed (exit status: 1)\n\n"
        "         [stderr]\n         /tmp/x/dist.py:318: UserWarning: Unknown distribution option: 'tests_require'\n"
        "           warnings.warn(msg)\n"
        "         error in gym setup command: 'extras_require' must be a dictionary whose values are strings\n\n"
        "hint: Build failures usually indicate a problem with the package or the build environment\n"
    )
    assert (
        build_cause(stderr)
        == "error in gym setup command: 'extras_require' must be a dictionary whose values are strings"
    )


@pytest.mark.network
def test_a_moved_pin_relaxes_the_pins_its_new_version_refuses() -> None:
    # tensorflow 2.9.2 has no Python 3.11 wheel, so its pin moves to 2.12.0, whose wheel asks for keras>=2.12,<2.13
    plan = Plan(constraints={"tensorflow": "2.12.0", "keras": "2.9.0", "numpy": "1.23.1", "six": "1.16.0"})
    relaxed = follow_moved_pins(plan, CPU, {"tensorflow": "2.12.0"})
    assert relaxed == ["keras"]
    assert plan.constraints == {"tensorflow": "2.12.0", "numpy": "1.23.1", "six": "1.16.0"}  # numpy 1.23 fits <1.24
    assert "keras<2.13,>=2.12.0" in plan.rows["keras"].reason and plan.rows["keras"].action == "version-changed"


@pytest.mark.network
def test_a_pinned_sdist_that_no_longer_builds_moves_and_says_why(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # gym 0.21.0's setup.py is refused by today's setuptools (and its metadata by every modern installer); a narrow
    # terminal must not cut uv's message of it (uv wraps at $COLUMNS: this test once read only its last fragment)
    monkeypatch.setenv("COLUMNS", "60")
    result = lock(_write(tmp_path, "gym==0.21.0\n"), CPU, tmp_path / "bundle", project_dir=tmp_path)
    row = {row.name: row for row in result.rows}["gym"]
    assert row.source == "0.21.0" and row.target != "0.21.0"
    assert "the sdist of 0.21.0 does not build with today's build tools (error in gym setup command" in row.reason
    # a compatible-release request (~=) asks for "about 0.21.0": the releases after it are the nearest
    near = lock(_write(tmp_path, "gym~=0.21.0\n"), CPU, tmp_path / "near", project_dir=tmp_path)
    relaxed = {row.name: row for row in near.rows}["gym"]
    assert "relaxed to gym>0.21.0" in relaxed.reason
    with pytest.raises(ResolverError) as info:  # any other specifier is the user's law: one line that says so
        lock(_write(tmp_path, "gym>=0.21.0,<0.22\n"), CPU, tmp_path / "range", project_dir=tmp_path)
    assert "\n" not in str(info.value) and str(info.value).startswith(
        "gym==0.21.0 (the release the environment allows)"
    )


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        (
            "https://github.com/pyannote/pyannote-audio/archive/refs/heads/develop.zip",
            ("git+https://github.com/pyannote/pyannote-audio.git", "develop"),
        ),
        ("https://github.com/o/r/archive/v1.0.tar.gz", ("git+https://github.com/o/r.git", "v1.0")),
        ("https://gitlab.com/o/r/-/archive/main/r-main.zip", ("git+https://gitlab.com/o/r.git", "main")),
        ("https://files.pythonhosted.org/packages/x/six-1.16.0.tar.gz", None),
    ],
)
def test_a_forge_archive_url_is_a_vcs_snapshot(url: str, expected: tuple[str, str] | None) -> None:
    assert forge_archive(url) == expected


def test_a_branch_archive_becomes_the_index_release_unless_kept() -> None:
    # source: dvrk-dvys/EZ_RVC requirements.txt (2114fbb767a7586c07cddbeb1521930c9d5979b6), one line of it
    dists = _reqs("pyannote-audio @ https://github.com/pyannote/pyannote-audio/archive/refs/heads/develop.zip")
    assert dists["pyannote-audio"].source.kind == "vcs"
    plan = translate(_env(dists), CPU)
    assert plan.requirements["pyannote-audio"] == "pyannote-audio" and "pyannote-audio" in plan.index_or_drop
    kept = translate(_env(dists), CPU, keep_vcs=True)
    assert kept.requirements["pyannote-audio"] == (
        "pyannote-audio @ git+https://github.com/pyannote/pyannote-audio.git@develop"
    )


@pytest.mark.network
def test_an_sdist_that_imports_pkg_resources_builds_with_the_setuptools_that_has_it(tmp_path: Path) -> None:
    # mmcv 2.2.0 is sdist-only and its setup.py imports pkg_resources, which setuptools 82 removed
    result = lock(_write(tmp_path, "mmcv==2.2.0\n"), CPU, tmp_path / "bundle", project_dir=tmp_path)
    assert {row.name: row for row in result.rows}["mmcv"].target == "2.2.0"  # the user's version, not moved
    manifest = tomllib.loads((result.bundle_dir / "rawvm-env.toml").read_text())
    assert manifest["install"]["build_constraints"] == ["setuptools<82"]  # the VM builds it the same way
    assert any("pkg_resources" in warning and "mmcv==2.2.0" in warning for warning in result.warnings)


@pytest.mark.network
def test_a_compiled_package_without_a_wheel_moves_and_a_pure_sdist_stays(tmp_path: Path) -> None:
    # pyarrow 9.0.0 has no Python 3.11 wheel (its sdist needs Arrow C++ on the VM); htmlmin never had a wheel
    source = _write(tmp_path, "pyarrow==9.0.0\nhtmlmin==0.1.12\n")
    _, rows = _lock_cpu(source, tmp_path)
    assert rows["pyarrow"].action == "version-changed" and rows["pyarrow"].source == "9.0.0"
    assert int(rows["pyarrow"].target.split(".")[0]) >= 10 and "its sdist is compiled code" in rows["pyarrow"].reason
    assert rows["htmlmin"].action == "builds-from-source" and rows["htmlmin"].target == "0.1.12"
    strict = lock(source, CPU, tmp_path / "strict", project_dir=tmp_path, strict=True)
    assert {row.name: row for row in strict.rows}["pyarrow"].action == "builds-from-source"  # --strict moves nothing


@pytest.mark.network
def test_a_package_linux_has_only_for_other_platforms_says_so(tmp_path: Path) -> None:
    # tensorflow-addons (from a real freeze, acodet's) ships manylinux wheels for x86_64 only, never aarch64
    arm = Target(arch="aarch64", python="3.11", glibc="2.39")
    with pytest.raises(ResolverError) as info:
        lock(
            _write(tmp_path, "tensorflow-addons==0.19.0\nsix==1.16.0\n"), arm, tmp_path / "bundle", project_dir=tmp_path
        )
    message = str(info.value)
    assert message.startswith("tensorflow-addons has no build for linux-aarch64 Python 3.11") and "\n" not in message
    assert "manylinux" in message and "x86_64" in message


def test_a_forge_release_file_is_replaced_like_a_vcs_source_unless_kept() -> None:
    # source: mahmadza/sturdy-barnacle requirements.txt (df3a0dde8cfae979beb4084ef06674fea5a8e318), one line of it
    url = (
        "https://github.com/explosion/spacy-models/releases/download/en_core_web_sm-3.8.0/"
        "en_core_web_sm-3.8.0-py3-none-any.whl#sha256=1932429db727d4bff3deed6b34cfc05df17794f4a52eeb26cf8928f7c1a0fb85"
    )
    dists = _reqs(f"en-core-web-sm @ {url}")
    plan = translate(_env(dists), CPU)
    assert plan.requirements["en-core-web-sm"] == "en-core-web-sm" and plan.constraints["en-core-web-sm"] == "3.8.0"
    assert (
        "code-forge download" in plan.rows["en-core-web-sm"].reason
        and "--keep-vcs" in plan.rows["en-core-web-sm"].reason
    )
    assert "--keep-vcs" in plan.index_or_drop["en-core-web-sm"]  # no index release: dropped, saying how to keep it
    kept = translate(_env(dists), CPU, keep_vcs=True)
    assert kept.requirements["en-core-web-sm"] == f"en-core-web-sm @ {url}"
