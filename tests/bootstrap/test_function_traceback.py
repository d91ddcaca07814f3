"""A remote traceback of a script's ``@rawvm.function`` (sent by value) on a real local machine shows the
script's file name and source lines, not ``File "<dynamic-code>", line 5``."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from rawvm import api, clusters

from tests.helpers.local import local_project

pytestmark = [pytest.mark.network, pytest.mark.slow]

SCRIPT = """\
import rawvm


def ratio(x):
    return 10 / x


@rawvm.function(keepalive="10s")
def job(x):
    y = x - 1
    return ratio(y)


print(job(1))
"""


def test_a_scripts_remote_traceback_shows_its_file_and_lines(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    project, _, env = local_project(tmp_path, {"job.py": SCRIPT})
    monkeypatch.setenv("RAWVM_STATE_DIR", env["RAWVM_STATE_DIR"])
    try:
        done = subprocess.run(
            [sys.executable, "job.py"], cwd=project, env=env, capture_output=True, text=True, timeout=600
        )
    finally:
        for record in clusters.all_records():
            api.down(record.name)
    assert done.returncode == 1
    assert "ZeroDivisionError: division by zero" in done.stderr
    remote = done.stderr.split("RemoteTraceback", 1)[-1]
    assert "<dynamic-code>" not in done.stderr, done.stderr
    script = project / "job.py"
    assert f'File "{script}", line 11, in job\n    return ratio(y)' in remote, done.stderr
    assert f'File "{script}", line 5, in ratio\n    return 10 / x' in remote, done.stderr
