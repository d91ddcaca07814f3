"""For the tests that start local machines (agent processes on this host) through rawvm's CLI or API."""

from __future__ import annotations

import os
import queue
import subprocess
import tempfile
import threading
from pathlib import Path

import psutil
import pytest


def isolate_state(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """This process's rawvm state and temporary files under ``tmp_path`` (``state/``, ``tmp/``) for one test."""
    monkeypatch.setenv("RAWVM_STATE_DIR", str(tmp_path / "state"))
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))  # gettempdir() caches TMPDIR per process
    (tmp_path / "tmp").mkdir()
    return tmp_path


def local_project(root: Path, files: dict[str, str]) -> tuple[Path, Path, dict[str, str]]:
    """(project, tmp, env) under ``root``: a project dir holding ``files`` (name -> text), an empty TMPDIR where
    the local machines live, and a rawvm CLI's environment with its state in ``root / "state"``."""
    project = root / "project"
    project.mkdir()
    for name, text in files.items():
        (project / name).write_text(text)
    tmp = root / "tmp"
    tmp.mkdir()
    env = {**os.environ, "RAWVM_STATE_DIR": str(root / "state"), "TMPDIR": str(tmp)}
    return project, tmp, env


def processes_under(path: Path) -> list[psutil.Process]:
    """Every process whose command line mentions ``path`` (a local machine's wrapper and agent name its dir)."""
    return [p for p in psutil.process_iter(["cmdline"]) if any(str(path) in part for part in p.info["cmdline"] or [])]


def stream_stdout(
    argv: list[str], cwd: Path, env: dict[str, str]
) -> tuple[subprocess.Popen[str], queue.Queue[str], threading.Thread]:
    """Starts ``argv`` with stdout and stderr piped as text; a started daemon thread puts its stdout lines on the
    queue as they come: (process, lines, that thread)."""
    proc = subprocess.Popen(argv, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lines: queue.Queue[str] = queue.Queue()
    reader = threading.Thread(target=lambda: [lines.put(line) for line in proc.stdout or []], daemon=True)
    reader.start()
    return proc, lines, reader
