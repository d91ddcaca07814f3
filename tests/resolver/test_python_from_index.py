"""A plain freeze records no Python: the lock asks the index which wheels its pins have (issue 23, scope 2).

numpy 1.22.4 has wheels for cp38 to cp310 only, so a freeze pinning it was made on 3.10 at the newest; locked for
the running Python (3.11 or later) it builds from source or fails. Real PyPI and a real closed port, no mocks.
"""

from __future__ import annotations

import time
import tomllib
from pathlib import Path

import pytest
from rawvm.cli import main
from rawvm_images.ec2 import UBUNTU_2404_GLIBC
from rawvm_resolver import Target, lock
from rawvm_resolver.python_choice import NO_PYTHON_RECORDED, running_python
from rawvm_resolver.python_from_index import infer_python_from_index, python_from_index
from rawvm_resolver.scan import scan
from rawvm_resolver.sources import requirement_file_indexes

from tests.systools import need_index

FREEZE = "numpy==1.22.4\nsix==1.16.0\npython-dateutil==2.8.2\n"  # numpy: cp38..cp310; the others pure
X86 = Target(arch="x86_64", python="", glibc=UBUNTU_2404_GLIBC)
CLOSED_INDEX = "http://127.0.0.1:9/simple"  # the discard port: nothing listens, the connection is refused at once


def test_reading_a_freeze_stays_offline_and_records_no_python(tmp_path: Path) -> None:
    freeze = tmp_path / "requirements.txt"
    freeze.write_text(FREEZE)
    assert scan(freeze).platform.python_from == NO_PYTHON_RECORDED


def test_an_unreachable_index_leaves_the_running_python_with_a_reason_fast(tmp_path: Path) -> None:
    freeze = tmp_path / "requirements.txt"
    freeze.write_text(f"--index-url {CLOSED_INDEX}\n{FREEZE}")
    started = time.monotonic()
    env = infer_python_from_index(scan(freeze))
    assert time.monotonic() - started < 5
    assert env.platform.python_xy == running_python()
    assert f"the index {CLOSED_INDEX} could not be asked" in env.platform.python_from


def test_an_input_that_records_its_python_is_not_asked_about(tmp_path: Path) -> None:
    freeze = tmp_path / "requirements.txt"
    freeze.write_text(f"--index-url {CLOSED_INDEX}\nnumpy==1.22.4 ; python_version < '3.11'\ntomli==2.0.1\n")
    env = scan(freeze)
    assert infer_python_from_index(env) == env  # the marker told it: no lookup, even of a dead index


def test_the_indexes_a_requirements_file_and_its_includes_name(tmp_path: Path) -> None:
    (tmp_path / "base.txt").write_text("--extra-index-url https://download.pytorch.org/whl/cpu\nsix==1.16.0\n")
    (tmp_path / "requirements.txt").write_text("-r base.txt\n-i https://mirror.example/simple\nnumpy==1.22.4\n")
    assert requirement_file_indexes(tmp_path / "requirements.txt") == (
        "https://mirror.example/simple",
        ("https://download.pytorch.org/whl/cpu",),
    )
    (tmp_path / "other.txt").write_text("--index-url=https://other.example/simple\n")
    assert requirement_file_indexes(tmp_path / "other.txt") == ("https://other.example/simple", ())


@pytest.mark.network
def test_a_freeze_gets_the_newest_python_every_pin_has_a_wheel_for(tmp_path: Path) -> None:
    need_index()
    freeze = tmp_path / "requirements.txt"
    freeze.write_text(FREEZE)
    platform = infer_python_from_index(scan(freeze)).platform
    assert platform.python == "3.10"
    assert platform.python_from == (
        "the newest Python every pinned package has a wheel for on https://pypi.org/simple (cp310 wheels)"
    )


@pytest.mark.network
def test_pure_pins_keep_the_running_python() -> None:
    need_index()
    choice = python_from_index({"six": "1.16.0", "requests": "2.31.0", "python-dateutil": "2.8.2"})
    assert choice.python == running_python()
    assert "every pin installs on any Python 3" in choice.reason


@pytest.mark.network
def test_the_lock_keeps_the_old_pin_and_says_how_python_was_chosen(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    need_index()
    freeze = tmp_path / "requirements.txt"
    freeze.write_text(FREEZE)
    monkeypatch.chdir(tmp_path)
    assert main(["lock", "--from", str(freeze), "--json", "-o", str(tmp_path / "bundle")]) == 0
    captured = capsys.readouterr()
    assert "rawvm: Python 3.10: the newest Python every pinned package has a wheel for on" in captured.err
    assert '"python_from": "the newest Python every pinned package has a wheel for on' in captured.out
    locked = tomllib.loads((tmp_path / "bundle" / "pylock.toml").read_text())
    versions = {package["name"]: package["version"] for package in locked["packages"]}
    assert versions["numpy"] == "1.22.4"
    assert locked["requires-python"].startswith("==3.10")


@pytest.mark.network
def test_python_on_the_command_line_still_wins(tmp_path: Path) -> None:
    need_index()
    freeze = tmp_path / "requirements.txt"
    freeze.write_text(FREEZE)
    target = Target(arch="x86_64", python="3.9", glibc=UBUNTU_2404_GLIBC)
    result = lock(freeze, target, tmp_path / "bundle", project_dir=tmp_path)
    assert (result.target.python, result.python_from) == ("3.9", "--python")
