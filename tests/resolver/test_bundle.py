"""Bundle pieces that need no network: code.tar.gz (git's view, reproducible), pylock normalisation, the report."""

from __future__ import annotations

import io
import subprocess
import tarfile
from pathlib import Path

import pytest
from rawvm_resolver.errors import ResolverError
from rawvm_resolver.project import MAX_FILE_BYTES, code_archive, list_project_files
from rawvm_resolver.pylock import build_pylock
from rawvm_resolver.report import ReportRow, format_table, to_json
from rawvm_resolver.target import Target
from rawvm_resolver.uv_messages import mentioned, summarise

SHA = "a" * 64


def git(cwd: Path, *args: str) -> None:
    subprocess.run(
        ["git", "-c", "user.email=t@t", "-c", "user.name=t", *args], cwd=cwd, check=True, capture_output=True
    )


def test_git_project_honours_gitignore_and_includes_untracked(tmp_path: Path) -> None:
    git(tmp_path, "init", "-q")
    (tmp_path / ".gitignore").write_text("data/\n*.log\n")
    (tmp_path / "train.py").write_text("print(1)\n")
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "big.csv").write_text("x\n")
    (tmp_path / "run.log").write_text("log\n")
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "model.py").write_text("W = 1\n")
    git(tmp_path, "add", "train.py", ".gitignore")
    git(tmp_path, "commit", "-q", "-m", "init")
    (tmp_path / "notes.txt").write_text("untracked but not ignored\n")
    (tmp_path / "huge.bin").write_bytes(b"\0" * (MAX_FILE_BYTES + 1))
    project = list_project_files(tmp_path, exclude=(tmp_path / "bundle",))
    assert project.files == (".gitignore", "notes.txt", "pkg/model.py", "train.py")
    assert project.skipped and project.skipped[0].startswith("huge.bin")


def test_walk_without_git_skips_venvs_and_caches(tmp_path: Path) -> None:
    (tmp_path / "main.py").write_text("")
    (tmp_path / "env").mkdir()
    (tmp_path / "env" / "pyvenv.cfg").write_text("")
    (tmp_path / "env" / "lib.py").write_text("")
    (tmp_path / "__pycache__").mkdir()
    (tmp_path / "__pycache__" / "main.cpython-311.pyc").write_bytes(b"")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "rawvm-env.toml").write_text("")
    assert list_project_files(tmp_path, exclude=(tmp_path / "out",)).files == ("main.py",)


def test_code_archive_is_reproducible(tmp_path: Path) -> None:
    (tmp_path / "b.py").write_text("b\n")
    (tmp_path / "a.sh").write_text("#!/bin/sh\n")
    (tmp_path / "a.sh").chmod(0o755)
    first = code_archive(list_project_files(tmp_path))
    (tmp_path / "b.py").touch()  # a new mtime changes nothing
    assert code_archive(list_project_files(tmp_path)) == first
    with tarfile.open(fileobj=io.BytesIO(first)) as archive:
        members = {m.name: m for m in archive.getmembers()}
    assert list(members) == ["a.sh", "b.py"]
    assert members["a.sh"].mode == 0o755 and members["b.py"].mode == 0o644
    assert all(m.mtime == 0 and m.uname == "" for m in members.values())
    assert first[4:8] == b"\0\0\0\0"  # gzip header time


def uv_entry(name: str, wheels: list[str], sdist: bool = True) -> dict[str, object]:
    entry: dict[str, object] = {"name": name, "version": "1.0"}
    if wheels:
        entry["wheels"] = [{"url": f"https://f/{w}", "size": 1, "hashes": {"sha256": SHA}} for w in wheels]
    if sdist:
        entry["sdist"] = {"url": f"https://f/{name}-1.0.tar.gz", "size": 1, "hashes": {"sha256": SHA}}
    return entry


def test_a_file_removed_after_listing_is_left_out_of_the_archive(tmp_path: Path) -> None:
    (tmp_path / "main.py").write_text("print(1)\n")
    (tmp_path / "build.tmp").write_text("gone soon\n")
    listed = list_project_files(tmp_path)
    (tmp_path / "build.tmp").unlink()  # a concurrent build removed it between the listing and the archive
    with tarfile.open(fileobj=io.BytesIO(code_archive(listed)), mode="r:gz") as archive:
        assert archive.getnames() == ["main.py"]


def test_pylock_keeps_target_wheels_only_and_sdists_only_without_a_wheel() -> None:
    uv_lock = {"packages": [uv_entry("b", ["b-1.0-py3-none-any.whl"]), uv_entry("a", [])]}
    document = build_pylock(uv_lock, Target(arch="x86_64", python="3.11"), [])
    assert [p["name"] for p in document["packages"]] == ["a", "b"]
    assert "sdist" in document["packages"][0] and "wheels" not in document["packages"][0]
    assert "sdist" not in document["packages"][1]
    assert document["environments"] == ["sys_platform == 'linux' and platform_machine == 'x86_64'"]
    assert document["requires-python"] == "==3.11.*"


def test_pylock_refuses_an_artifact_without_sha256() -> None:
    entry = {"name": "x", "version": "1", "wheels": [{"url": "https://f/x-1-py3-none-any.whl", "hashes": {}}]}
    with pytest.raises(ResolverError, match="no sha256"):
        build_pylock({"packages": [entry]}, Target(arch="x86_64", python="3.11"), [])


def test_report_table_and_json() -> None:
    rows = [
        ReportRow("torch", "translated", "2.5.1", "2.5.1", "CUDA build"),
        ReportRow("appnope", "dropped", "0.1.4", "", "macOS only"),
        ReportRow("numpy", "kept", "2.1.3", "2.1.3", "same version"),
    ]
    table = format_table(rows, title="linux-x86_64")
    assert table.splitlines()[1] == "1 translated, 1 dropped, 1 kept"
    assert "appnope  0.1.4 -> (none)" in table
    assert '"name": "appnope"' in to_json(rows)


def test_uv_messages_become_one_line_naming_the_packages() -> None:
    stderr = (
        "  \u00d7 No solution found when resolving dependencies:\n"
        "  ╰─▶ Because pyobjc-core==10.3 has no wheels with a matching platform tag and you require\n"
        "      pyobjc-core==10.3, we can conclude that your requirements are unsatisfiable.\n"
    )
    assert "\n" not in summarise(stderr)
    assert summarise(stderr).startswith("Because pyobjc-core==10.3")
    assert mentioned(stderr, ["numpy", "pyobjc-core", "pyobjc"]) == ["pyobjc-core"]
