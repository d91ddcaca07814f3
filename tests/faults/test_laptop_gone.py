"""The laptop goes away mid-stream: ``rawvm run`` is SIGKILLed while its task streams output (the lid shut, the
terminal closed, the process OOM-killed). The machine is on its own from then on: the task runs to its end, the
machine powers off after its keepalive, the task's whole output is in the sink, and ``rawvm logs`` shows it.

The real CLI on the default ``local`` provider, as the README runs it; the project's requirements are empty, so
no package index is needed.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests import reliability
from tests.helpers.local import local_project, processes_under, stream_stdout

pytestmark = [pytest.mark.faults, pytest.mark.slow]

LINES = 120
JOB = f"""\
import time
for i in range({LINES}):
    print("line", i, flush=True)
    time.sleep(0.05)
"""


def test_rawvm_run_killed_mid_stream_the_machine_finishes_powers_off_and_logs_show_everything(tmp_path: Path) -> None:
    project, tmp, env = local_project(tmp_path, {"requirements.txt": "", "job.py": JOB})
    command = [sys.executable, "-m", "rawvm.cli", "run", "--name", "laptop", "--keepalive", "3s"]
    laptop, lines, _ = stream_stdout([*command, "--from", "requirements.txt", "--", "python", "job.py"], project, env)
    try:
        seen = [lines.get(timeout=180) for _ in range(10)]  # streaming: ten lines in, the task still running
        assert seen == [f"line {i}\n" for i in range(10)]
        laptop.send_signal(signal.SIGKILL)  # no goodbye: nothing in rawvm gets to clean up or say anything
        assert laptop.wait(10) == -signal.SIGKILL
    finally:
        if laptop.poll() is None:
            laptop.kill()
    killed_at = time.monotonic()

    deadline = killed_at + 120
    while (processes_under(tmp) or any(tmp.glob("rawvm-local-*/laptop"))) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert processes_under(tmp) == [], "the machine is still running"
    assert not any(tmp.glob("rawvm-local-*/laptop")), "the machine's directory is still there"
    gone_after = time.monotonic() - killed_at

    logs = subprocess.run(
        [sys.executable, "-m", "rawvm.cli", "logs", "laptop"], cwd=project, env=env, capture_output=True, text=True
    )
    assert logs.returncode == 0, logs.stderr
    assert logs.stdout.splitlines() == [f"line {i}" for i in range(LINES)]  # every line, also those after the kill
    assert "has stopped: this is the output it flushed" in logs.stderr
    print(f"laptop gone after 10 lines; machine finished, flushed and powered off {gone_after:.1f}s later")
    reliability.survived("laptop gone mid-stream")
