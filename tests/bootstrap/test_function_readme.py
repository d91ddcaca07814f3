"""The README's "Functions" example, as a user runs it: a plain script, twice, in a fresh project directory.

The first run locks this environment (cloudpickle is in it), launches 3 local machines and prints the README's
results; the second, within the keepalive and in a new process, reuses the warm machines: no lock, no launch.
"""

from __future__ import annotations

import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
from rawvm import api, clusters

from tests.helpers.local import local_project, processes_under

pytestmark = [pytest.mark.network, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]
EXPECTED = "16\n25\n[0, 1, 4, 9, 16, 25, 36, 49, 64, 81]\n[1]\n"


def readme_example() -> str:
    section = (REPO / "README.md").read_text().split("## Functions", 1)[1]
    match = re.search(r"```python\n(.*?)```", section, re.S)
    assert match, "the README's Functions section has no python example"
    return match.group(1)


def test_the_readme_function_example_runs_and_a_second_run_reuses_the_machines(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    project, tmp, env = local_project(tmp_path, {"squares.py": readme_example()})
    monkeypatch.setenv("RAWVM_STATE_DIR", env["RAWVM_STATE_DIR"])

    def run() -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "squares.py"], cwd=project, env=env, capture_output=True, text=True, timeout=600
        )

    try:
        first = run()
        assert first.returncode == 0, first.stderr
        assert first.stdout == EXPECTED
        assert "launching 3 local machines" in first.stderr
        second = run()
        assert second.returncode == 0, second.stderr
        assert second.stdout == EXPECTED
        assert "launching" not in second.stderr and "scanning" not in second.stderr, second.stderr
        assert len(clusters.all_records()) == 1
    finally:
        for record in clusters.all_records():
            api.down(record.name)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and processes_under(tmp):
        time.sleep(0.2)
    assert not processes_under(tmp)
