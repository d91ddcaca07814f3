"""The machine's phase record: the bootstrap script's lines and the agent's, first time wins, order kept.

The shell part is the very prologue the user-data script runs (rawvm.agent.userdata.phase_prologue), run by the
system's ``sh``; the agent part is rawvm_agent.boot_phases on a real file.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from rawvm.agent.userdata import phase_prologue
from rawvm_agent.boot_phases import FILE_NAME, ORDER, BootPhases, parse


def test_the_scripts_lines_and_the_agents_make_one_ordered_record(tmp_path: Path) -> None:
    state = tmp_path / "state dir"  # a space: the script quotes the path
    script = "\n".join(["set -eu", *phase_prologue(str(state)), "sleep 0.05", "mark agent_venv_ready"])
    subprocess.run(["sh", "-c", script], check=True)
    assert (state.stat().st_mode & 0o777) == 0o700
    phases = BootPhases(state)
    phases.mark("agent_up", 2e9)
    recorded = phases.as_dict()
    assert list(recorded) == list(ORDER[:4])
    assert recorded["kernel_boot"] == int(recorded["kernel_boot"])  # btime: whole seconds
    assert recorded["kernel_boot"] <= recorded["bootstrap_start"] < recorded["agent_venv_ready"] < recorded["agent_up"]


def test_the_first_time_stands_across_agent_restarts(tmp_path: Path) -> None:
    first = BootPhases(tmp_path)
    first.mark("agent_up", 100.0)
    first.mark("environment_installed", 105.0)
    restarted = BootPhases(tmp_path)  # a new agent process on the same state dir
    restarted.mark("agent_up", 200.0)
    restarted.mark("first_task_started", 210.0)
    assert restarted.as_dict() == {"agent_up": 100.0, "environment_installed": 105.0, "first_task_started": 210.0}
    with pytest.raises(ValueError, match="unknown boot phase"):
        restarted.mark("lunch", 1.0)


def test_a_damaged_or_hostile_file_gives_only_what_it_can() -> None:
    text = "agent_up 5\nagent_up 9\nnonsense\nuv_ready nan\nbundle_downloaded -1\nkernel_boot x\nlunch 3\n"
    assert parse(text) == {"agent_up": 5.0}
    assert parse("agent_up 1\n" * 10_000) == {"agent_up": 1.0}
    assert FILE_NAME == "boot-phases"
