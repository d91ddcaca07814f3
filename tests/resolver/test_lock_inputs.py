"""Lock files as inputs (issue 23): every format told by content, its pins kept for Linux, the Python it records.

The real files are the corpus's ``lock-*`` directories (tests/data/real-envs, copied verbatim from public
repositories). Offline tests read them; the network tests lock each for linux-x86_64 with real uv against PyPI,
as ``rawvm lock --from DIR`` does, and check that every locked version Linux installs is kept.
"""

from __future__ import annotations

import shutil
import tomllib
from pathlib import Path

import pytest
from rawvm_images.ec2 import UBUNTU_2404_GLIBC
from rawvm_resolver import Target, lock
from rawvm_resolver.decisions import target_marker_environment
from rawvm_resolver.errors import InputError
from rawvm_resolver.lockfiles import lock_format, select_for_target
from rawvm_resolver.lockfiles.poetry_ranges import poetry_constraint
from rawvm_resolver.python_choice import choose_python
from rawvm_resolver.scan import scan

from tests.systools import need_index

CORPUS = Path(__file__).resolve().parents[1] / "data" / "real-envs"
LOCKS = {
    "poetry.lock": CORPUS / "lock-poetry-yaml-replace",
    "uv.lock": CORPUS / "lock-uv-doom",
    "pdm.lock": CORPUS / "lock-pdm-gilded-rose",
    "Pipfile.lock": CORPUS / "lock-pipfile-jira-deepseek",
    "pylock.toml": CORPUS / "lock-pylock-httpx-folio",
    "conda-lock.yml": CORPUS / "lock-conda-repro-course-ci",
}
X86 = Target(arch="x86_64", python="", glibc=UBUNTU_2404_GLIBC)


@pytest.mark.parametrize("name", sorted(LOCKS))
def test_each_format_is_told_by_content_whatever_its_name(name: str, tmp_path: Path) -> None:
    renamed = tmp_path / "locked-deps.txt"
    shutil.copy(LOCKS[name] / name, renamed)
    assert lock_format(renamed) == name
    env = scan(renamed)
    assert env.distributions or env.conda is not None


def test_a_requirements_file_or_environment_yml_is_no_lock() -> None:
    assert lock_format(CORPUS / "pip-acodet-m1.txt") is None
    assert lock_format(CORPUS / "conda-dojo-env-m1.yml") is None


@pytest.mark.parametrize("name", sorted(LOCKS))
def test_a_directory_holding_a_lock_reads_the_lock_and_says_where_its_python_came_from(name: str) -> None:
    env = scan(LOCKS[name])
    assert env.origin.endswith(name)
    assert env.platform.python_xy.startswith("3.") and env.platform.python_from


def test_the_python_comes_from_what_the_lock_records() -> None:
    assert scan(LOCKS["Pipfile.lock"]).platform.python_from == "the lock's _meta.requires records Python 3.12"
    poetry = scan(LOCKS["poetry.lock"]).platform
    assert (poetry.python, poetry.python_from) == (
        "3.12",
        "the newest Python every package with a listed wheel has one for (cp312 wheels)",
    )
    conda = scan(LOCKS["conda-lock.yml"]).platform
    assert conda.python == "3.12.5" and "conda python pin" in conda.python_from
    freeze = scan(CORPUS / "pip-twitterbot-croot-mac.txt").platform  # names a conda-built cp39 wheel
    assert freeze.python == "3.9" and "cp39 wheels" in freeze.python_from


def test_the_python_inference_rules() -> None:
    wheels = [["numpy-1.26.4-cp311-cp311-manylinux_2_17_x86_64.whl", "numpy-1.26.4-cp312-cp312-macosx_11_0_arm64.whl"]]
    wheels.append(["orjson-3.10.0-cp38-abi3-manylinux_2_17_x86_64.whl"])
    wheels.append(["six-1.16.0-py2.py3-none-any.whl"])
    assert choose_python(wheel_names=wheels).python == "3.12"
    ranged = choose_python(ranges=[(">=3.8,<3.10", "requires-python")])
    assert ranged.python in ("3.8", "3.9") and "requires-python >=3.8,<3.10" in ranged.reason
    assert choose_python(ranges=[("^3.10", "poetry's python constraint")], wheel_names=wheels).python == "3.12"
    markers = ['python_version >= "3.9" and python_version < "3.11"'] * 9 + ['python_version < "3.9"']
    assert choose_python(markers=markers).python in ("3.9", "3.10")


def test_pins_are_chosen_by_the_targets_markers() -> None:
    env = scan(LOCKS["pdm.lock"])
    assert any(dist.name == "colorama" and "win32" in dist.marker for dist in env.distributions)
    selected, rows = select_for_target(env, target_marker_environment(Target(arch="x86_64", python="3.12")))
    assert "colorama" not in selected.by_name()
    assert [(row.name, row.action) for row in rows] == [("colorama", "dropped")]
    assert not any(dist.marker for dist in selected.distributions)


def test_the_project_says_what_is_requested_and_the_lock_pins_the_rest() -> None:
    dists = scan(LOCKS["poetry.lock"]).by_name()
    assert dists["pyyaml"].requested and dists["pyyaml"].version == "6.0.1"
    assert dists["pytest"].requested  # the test group: `poetry install` installs it
    assert not dists["markupsafe"].requested and dists["markupsafe"].version == "2.1.5"
    pipfile = scan(LOCKS["Pipfile.lock"]).by_name()
    assert {name for name, dist in pipfile.items() if dist.requested} == {"pandas", "requests", "jira", "pyyaml"}


def test_poetry_ranges_become_pep_440() -> None:
    assert poetry_constraint("^6.0.1") == ">=6.0.1,<7"
    assert poetry_constraint("^0.24.4") == ">=0.24.4,<0.25"
    assert poetry_constraint("~3.1") == ">=3.1,<3.2"
    assert poetry_constraint(">=3.8.1,<4.0") == ">=3.8.1,<4.0"
    assert poetry_constraint(">= 1.2 < 2") == ">=1.2,<2"
    assert poetry_constraint("2.0") == "==2.0"
    assert poetry_constraint("*") == "" and poetry_constraint("^1 || ^2") == ""


def test_a_poetry_project_without_a_lock_reads_its_ranges(tmp_path: Path) -> None:
    shutil.copy(LOCKS["poetry.lock"] / "pyproject.toml", tmp_path / "pyproject.toml")
    env = scan(tmp_path)
    assert env.kind == "project"
    assert {"pyyaml<7,>=6.0.1", "jinja2<4,>=3.1.3"} <= set(env.requirements)
    assert "pytest<8,>=7.4.3" in env.requirements  # the test group
    assert "poetry's python constraint >=3.8.1,<4.0" in env.platform.python_from
    assert env.warnings and "yaml-replace" in env.warnings[0]  # only the pyproject.toml is here


def test_a_bare_dot_in_an_environment_yml_pip_section_is_the_local_project(tmp_path: Path) -> None:
    _local_project(tmp_path / "app", "dotapp")
    (tmp_path / "app" / "environment.yml").write_text("dependencies:\n  - pip:\n    - .\n    - six==1.16.0\n")
    dists = scan(tmp_path / "app" / "environment.yml").by_name()
    assert dists["dotapp"].source.kind == "directory"
    assert dists["dotapp"].source.local_path == (tmp_path / "app").resolve()


def _local_project(directory: Path, name: str, dependencies: str = "") -> None:
    (directory / name).mkdir(parents=True)
    (directory / name / "__init__.py").write_text("VALUE = 23\n")
    (directory / "pyproject.toml").write_text(
        f'[project]\nname = "{name}"\nversion = "0.2.0"\ndependencies = [{dependencies}]\n'
        '[build-system]\nrequires = ["setuptools>=61"]\nbuild-backend = "setuptools.build_meta"\n'
        f'[tool.setuptools]\npackages = ["{name}"]\n'
    )


# -- locking for real (network) --------------------------------------------------------------------------------


@pytest.mark.network
@pytest.mark.parametrize("name", sorted(LOCKS))
def test_a_real_lock_locks_for_linux_with_its_pins_kept(name: str, tmp_path: Path) -> None:
    need_index()
    directory = LOCKS[name]
    result = lock(directory, X86, tmp_path / "bundle", project_dir=tmp_path, pypi_only=name == "conda-lock.yml")
    locked = {
        package["name"]: package["version"]
        for package in tomllib.loads((result.bundle_dir / "pylock.toml").read_text())["packages"]
    }
    assert locked, f"{name}: nothing locked"
    env, _ = select_for_target(scan(directory), target_marker_environment(result.target))
    changed = {
        dist.name: (dist.version, locked[dist.name])
        for dist in env.distributions
        if dist.version and dist.name in locked and locked[dist.name] != dist.version and dist.source.kind == "index"
    }
    assert not changed, f"{name}: locked versions changed on Linux: {changed}"
    assert result.python_from and result.python_from != "--python"
    assert not [row for row in result.rows if row.action == "version-changed"], result.rows


@pytest.mark.network
def test_python_given_on_the_command_line_wins(tmp_path: Path) -> None:
    need_index()
    target = Target(arch="x86_64", python="3.11", glibc=UBUNTU_2404_GLIBC)
    result = lock(LOCKS["Pipfile.lock"], target, tmp_path / "bundle", project_dir=tmp_path)
    assert (result.target.python, result.python_from) == ("3.11", "--python")


@pytest.mark.network
def test_a_poetry_project_without_a_lock_locks_from_its_ranges(tmp_path: Path) -> None:
    need_index()
    project = tmp_path / "project"
    project.mkdir()
    shutil.copy(LOCKS["poetry.lock"] / "pyproject.toml", project / "pyproject.toml")
    result = lock(project, X86, tmp_path / "bundle", project_dir=project)
    locked = {
        package["name"]: package["version"]
        for package in tomllib.loads((result.bundle_dir / "pylock.toml").read_text())["packages"]
    }
    assert locked["pyyaml"].startswith("6.") and locked["jinja2"].startswith("3.")
    assert locked["pytest"].startswith("7.") and locked["faker"].startswith("20.")


@pytest.mark.network
def test_dot_in_a_pip_section_builds_the_local_project_into_wheels(tmp_path: Path) -> None:
    need_index()
    app = tmp_path / "app"
    _local_project(app, "dotapp", '"six==1.16.0"')
    (app / "environment.yml").write_text("dependencies:\n  - pip:\n    - .\n    - -e ./rawvm-no-such-subproject-23\n")
    result = lock(app / "environment.yml", X86, tmp_path / "bundle", project_dir=app)
    wheels = sorted(path.name for path in (result.bundle_dir / "wheels").iterdir())
    assert wheels == ["dotapp-0.2.0-py3-none-any.whl"]
    rows = {row.name: row for row in result.rows}
    assert rows["dotapp"].action == "kept" and "local package" in rows["dotapp"].reason
    assert rows["six"].target == "1.16.0"  # the local project's own dependency
    assert any("rawvm-no-such-subproject-23" in warning for warning in result.warnings), result.warnings


@pytest.mark.network
def test_an_input_whose_packages_all_drop_fails_with_one_line(tmp_path: Path) -> None:
    need_index()
    requirements = tmp_path / "requirements.txt"
    requirements.write_text("appnope==0.1.4\npyobjc-core==10.3.1\n")
    with pytest.raises(InputError) as error:
        lock(requirements, X86, tmp_path / "bundle", project_dir=tmp_path)
    message = str(error.value)
    assert "\n" not in message and "no packages" in message and "appnope" in message


def test_a_universal_uv_lock_keeps_the_version_for_the_targets_python(tmp_path: Path) -> None:
    (tmp_path / "uv.lock").write_text(
        'version = 1\nrequires-python = ">=3.9"\nresolution-markers = [\n'
        "    \"python_full_version >= '3.10'\",\n    \"python_full_version < '3.10'\",\n]\n\n"
        '[[package]]\nname = "numpy"\nversion = "2.0.2"\nsource = { registry = "https://pypi.org/simple" }\n'
        "resolution-markers = [\n    \"python_full_version < '3.10'\",\n]\n\n"
        '[[package]]\nname = "numpy"\nversion = "2.2.6"\nsource = { registry = "https://pypi.org/simple" }\n'
        "resolution-markers = [\n    \"python_full_version >= '3.10'\",\n]\n"
    )
    env = scan(tmp_path / "uv.lock")
    for python, version in (("3.9", "2.0.2"), ("3.12", "2.2.6")):
        selected, _ = select_for_target(env, target_marker_environment(Target(arch="x86_64", python=python)))
        assert selected.by_name()["numpy"].version == version
