"""The environment's fingerprint kept between warm runs (rawvm.env_fingerprint): the real scan on real files, counted;
every change to what it read scans again and gives the new fingerprint; a record it cannot trust is not kept."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from rawvm import env_fingerprint
from rawvm.env_fingerprint import environment_fingerprint
from rawvm_resolver.scan import scan


class CountingScan:
    """The resolver's own scan, counting its calls."""

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, source: str | Path | None) -> Any:
        self.calls += 1
        return scan(source)


@pytest.fixture
def state(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("RAWVM_STATE_DIR", str(tmp_path / "state"))
    # Inputs written a moment ago are not trusted (FRESH_S); these tests write theirs just before, on purpose.
    monkeypatch.setattr(env_fingerprint, "FRESH_S", -5.0)
    return tmp_path / "state"


def fingerprint(source: Path, counter: CountingScan) -> str:
    found = environment_fingerprint(source, scan=counter)
    assert found == scan(source).fingerprint()  # kept or not, always what a scan says now
    return found


def test_unchanged_requirements_are_not_scanned_again(tmp_path: Path, state: Path) -> None:
    requirements = tmp_path / "project" / "requirements.txt"
    requirements.parent.mkdir()
    requirements.write_text("humanize\n")
    counter = CountingScan()
    first = fingerprint(requirements, counter)
    assert fingerprint(requirements, counter) == first
    assert fingerprint(requirements, counter) == first
    assert counter.calls == 1
    assert (state / "fingerprints.json").is_file()

    requirements.write_text("humanize\nsix\n")  # a change after a kept fingerprint: scanned, new fingerprint
    changed = fingerprint(requirements, counter)
    assert changed != first
    assert counter.calls == 2
    assert fingerprint(requirements, counter) == changed
    assert counter.calls == 2


def test_a_change_in_an_included_file_scans_again(tmp_path: Path, state: Path) -> None:
    shared = tmp_path / "shared" / "base.txt"
    shared.parent.mkdir()
    shared.write_text("humanize\n")
    requirements = tmp_path / "project" / "requirements.txt"
    requirements.parent.mkdir()
    requirements.write_text("-r ../shared/base.txt\n")
    counter = CountingScan()
    first = fingerprint(requirements, counter)
    assert fingerprint(requirements, counter) == first and counter.calls == 1
    shared.write_text("humanize==4.9.0\n")  # outside the project, read through -r
    assert fingerprint(requirements, counter) != first
    assert counter.calls == 2


def test_a_project_named_by_a_file_added_to_an_editable_path(tmp_path: Path, state: Path) -> None:
    """``-e ./pkg`` without a pyproject.toml is named after its directory; one added there renames it."""
    project = tmp_path / "project"
    (project / "pkg").mkdir(parents=True)
    requirements = project / "requirements.txt"
    requirements.write_text("-e ./pkg\n")
    counter = CountingScan()
    first = fingerprint(requirements, counter)
    assert fingerprint(requirements, counter) == first and counter.calls == 1
    (project / "pkg" / "pyproject.toml").write_text('[project]\nname = "renamed"\nversion = "1.0"\n')
    assert fingerprint(requirements, counter) != first
    assert counter.calls == 2


def test_a_directory_source_sees_a_new_input_appear(tmp_path: Path, state: Path) -> None:
    project = tmp_path / "project"
    project.mkdir()
    (project / "requirements.txt").write_text("humanize\n")
    counter = CountingScan()
    first = fingerprint(project, counter)
    assert fingerprint(project, counter) == first and counter.calls == 1
    # pyproject.toml goes before requirements.txt in a directory (rawvm_resolver.inputs.find_in_directory)
    (project / "pyproject.toml").write_text('[project]\nname = "app"\nversion = "0.1"\ndependencies = ["six"]\n')
    assert fingerprint(project, counter) != first
    assert counter.calls == 2


def dist_info(site: Path, name: str, version: str) -> None:
    path = site / f"{name}-{version}.dist-info"
    path.mkdir(parents=True)
    (path / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
    (path / "WHEEL").write_text("Wheel-Version: 1.0\nTag: py3-none-any\n")


def test_a_venv_that_gains_or_upgrades_a_package_scans_again(tmp_path: Path, state: Path) -> None:
    venv = tmp_path / "venv"
    site = venv / "lib" / "python3.11" / "site-packages"
    site.mkdir(parents=True)
    (venv / "pyvenv.cfg").write_text("version_info = 3.11.7\n")
    dist_info(site, "humanize", "4.9.0")
    counter = CountingScan()
    first = fingerprint(venv, counter)
    assert fingerprint(venv, counter) == first and counter.calls == 1
    dist_info(site, "six", "1.16.0")
    second = fingerprint(venv, counter)
    assert second != first and counter.calls == 2
    assert fingerprint(venv, counter) == second and counter.calls == 2
    # an upgrade in place of its metadata (same directory name): the file the scan read changed
    (site / "six-1.16.0.dist-info" / "METADATA").write_text("Metadata-Version: 2.1\nName: six\nVersion: 1.17.0\n")
    assert fingerprint(venv, counter) != second
    assert counter.calls == 3


def test_inputs_written_a_moment_ago_are_not_kept(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A file changed within the file system's timestamp tick could change again with the same stamp: scanned
    each time until it has been quiet for FRESH_S."""
    monkeypatch.setenv("RAWVM_STATE_DIR", str(tmp_path / "state"))
    requirements = tmp_path / "requirements.txt"
    requirements.write_text("humanize\n")
    counter = CountingScan()
    fingerprint(requirements, counter)
    fingerprint(requirements, counter)
    assert counter.calls == 2
    assert not (tmp_path / "state" / "fingerprints.json").exists()


def test_a_scan_that_starts_a_process_is_not_kept(tmp_path: Path, state: Path) -> None:
    """What a child process read shows in no audit event here: an interpreter source is scanned every time."""
    requirements = tmp_path / "requirements.txt"
    requirements.write_text("humanize\n")
    calls = []

    def probing(source: str | Path | None) -> Any:
        calls.append(source)
        subprocess.run([sys.executable, "-c", "pass"], check=True)
        return scan(source)

    first = environment_fingerprint(requirements, scan=probing)
    assert environment_fingerprint(requirements, scan=probing) == first
    assert len(calls) == 2


def test_a_damaged_cache_is_a_miss(tmp_path: Path, state: Path) -> None:
    requirements = tmp_path / "requirements.txt"
    requirements.write_text("humanize\n")
    state.mkdir(parents=True)
    (state / "fingerprints.json").write_text("{not json")
    counter = CountingScan()
    first = fingerprint(requirements, counter)
    assert fingerprint(requirements, counter) == first
    assert counter.calls == 1
