"""The dead-man units, checked by systemd's own tools: ``systemd-analyze verify`` loads them (any warning
fails the test) and ``systemd-analyze timespan`` reads their time values. The chain is then checked unit
by unit: restart → watchdog → OnFailure power-off → backstops. Needs the Debian package ``systemd``.
The agent's own last step, ``rawvm_agent.stopper.power_off``, is tested here too, with real commands."""

from __future__ import annotations

import configparser
import shlex
import signal
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from rawvm_agent import systemd
from rawvm_agent.config import IdleConfig
from rawvm_agent.stopper import PowerOffError, power_off
from rawvm_agent.systemd import render_backstop_command, render_units

from tests.systools import need_tool

MAX_LIFETIME = 2 * 3600.0
GRACE = 600.0


def write_units(directory: Path, units: dict[str, str]) -> list[Path]:
    paths = []
    for name, text in units.items():
        path = directory / name
        path.write_text(text)
        paths.append(path)
    return paths


def verify(paths: list[Path]) -> subprocess.CompletedProcess[str]:
    analyze = need_tool("systemd-analyze", "systemd")
    return subprocess.run(
        [analyze, "verify", "--man=no", *map(str, paths)], capture_output=True, text=True, timeout=60, check=False
    )


def usec(span: str) -> int:
    """Microseconds in a systemd time span, as systemd itself parses it."""
    analyze = need_tool("systemd-analyze", "systemd")
    out = subprocess.run([analyze, "timespan", span], capture_output=True, text=True, check=True, timeout=30).stdout
    return int(next(line for line in out.splitlines() if line.strip().startswith("μs:")).split(":")[1])


def parse(text: str) -> configparser.ConfigParser:
    parser = configparser.ConfigParser(interpolation=None, strict=True, comment_prefixes=("#",))
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read_string(text)
    return parser


@pytest.fixture
def units() -> dict[str, str]:
    # The real layout on a VM is /opt/rawvm/agent/bin/rawvm-agent; verify needs an executable that exists.
    return render_units(
        agent_command=[sys.executable, "-m", "rawvm_agent"],
        config_path="/etc/rawvm/agent.toml",
        max_lifetime=MAX_LIFETIME,
        grace=GRACE,
    )


def test_systemd_loads_every_unit_without_a_single_warning(tmp_path: Path, units: dict[str, str]) -> None:
    result = verify(write_units(tmp_path, units))
    assert result.returncode == 0 and result.stdout == "" and result.stderr == "", result


def test_verify_is_a_real_check(tmp_path: Path, units: dict[str, str]) -> None:
    """The negative control: the same verification rejects a missing binary and warns on a bad value."""
    missing = render_units(agent_command=["/nonexistent/rawvm-agent"], config_path="/x", max_lifetime=60)
    result = verify(write_units(tmp_path, {systemd.AGENT_UNIT: missing[systemd.AGENT_UNIT]}))
    assert result.returncode != 0 and "/nonexistent/rawvm-agent" in result.stderr
    broken = units[systemd.AGENT_UNIT].replace("Restart=on-failure", "Restart=sometimes")
    result = verify(write_units(tmp_path, {systemd.AGENT_UNIT: broken}))
    assert "Restart" in result.stderr or "restart" in result.stderr


def test_the_chain_restart_watchdog_onfailure_poweroff(units: dict[str, str]) -> None:
    agent = parse(units[systemd.AGENT_UNIT])
    service = agent["Service"]
    assert service["Type"] == "notify" and service["NotifyAccess"] == "main"
    # 1. A crash or SIGKILL is a failure → restarted; the agent reloads its idle clock from its state file.
    assert service["Restart"] == "on-failure"
    # ... and so is a clean exit nobody asked for (a stray SIGTERM): only systemd's own stop ends it.
    assert set(service["RestartForceExitStatus"].split()) == {"0", "SIGTERM", "SIGINT", "SIGHUP", "SIGPIPE"}
    # 2. A hung event loop stops the pings → killed after WatchdogSec → a failure → step 1.
    assert usec(service["WatchdogSec"]) == 60 * 1_000_000
    # ... and one that does not exit on the watchdog's SIGABRT is SIGKILLed 30 s later, not TimeoutStopSec later.
    assert usec(service["TimeoutAbortSec"]) == 30 * 1_000_000 < usec(service["TimeoutStopSec"])
    # 3. Restarts exhausted → failed → OnFailure=. Every start counts, so 5 restarts = 6 starts, and a
    #    tight crash loop must fit the window or it would never exhaust it.
    unit = agent["Unit"]
    assert unit["OnFailure"] == systemd.POWEROFF_UNIT
    assert int(unit["StartLimitBurst"]) == 5 + 1
    assert usec(unit["StartLimitIntervalSec"]) > int(unit["StartLimitBurst"]) * usec(service["RestartSec"])
    # A task killed by the OOM killer must not take the agent (and its idle clock) down with it.
    assert service["OOMPolicy"] == "continue"
    # 4. The power-off unit: no implicit Conflicts=shutdown.target, and PID 1 forces it if systemctl fails.
    poweroff = parse(units[systemd.POWEROFF_UNIT])
    assert poweroff["Unit"]["DefaultDependencies"] == "no"
    assert poweroff["Unit"]["FailureAction"] == "poweroff-force"
    assert poweroff["Service"]["Type"] == "oneshot"
    assert shlex.split(poweroff["Service"]["ExecStart"]) == ["systemctl", "poweroff"]


def test_backstops_fire_at_max_lifetime_plus_grace(units: dict[str, str]) -> None:
    minutes = int((MAX_LIFETIME + GRACE) // 60)
    timer = parse(units[systemd.BACKSTOP_TIMER])
    assert usec(timer["Timer"]["OnBootSec"]) == minutes * 60 * 1_000_000
    assert timer["Timer"]["Unit"] == systemd.POWEROFF_UNIT
    backstop = parse(units[systemd.BACKSTOP_SERVICE])
    assert shlex.split(backstop["Service"]["ExecStart"]) == render_backstop_command(MAX_LIFETIME, GRACE)
    assert render_backstop_command(MAX_LIFETIME, GRACE) == ["shutdown", "-P", f"+{minutes}"]
    # Everything cloud-init enables has an [Install] section, backstops before the agent.
    for name in systemd.ENABLE:
        assert "Install" in parse(units[name])
    assert systemd.ENABLE[-1] == systemd.AGENT_UNIT


def test_backstop_minutes_round_up() -> None:
    assert render_backstop_command(3600, 600) == ["shutdown", "-P", "+70"]
    assert render_backstop_command(3601, 0) == ["shutdown", "-P", "+61"]
    assert render_backstop_command(1, 0) == ["shutdown", "-P", "+1"]
    assert render_backstop_command(12 * 3600) == ["shutdown", "-P", "+730"]


def test_exec_start_quoting_survives_systemd(tmp_path: Path) -> None:
    """An agent path with a space, % and $ only verifies if systemd reads the quoting back exactly."""
    odd_dir = tmp_path / "rawvm agent 100% $HOME"
    odd_dir.mkdir()
    binary = odd_dir / "rawvm-agent"
    binary.write_text("#!/bin/sh\n")
    binary.chmod(binary.stat().st_mode | stat.S_IXUSR)
    units = render_units(
        agent_command=[str(binary), "--label", 'say "hi" $PATH'], config_path="/etc/rawvm/a b.toml", max_lifetime=60
    )
    result = verify(write_units(tmp_path, units))
    assert result.returncode == 0 and result.stderr == "", result
    exec_start = parse(units[systemd.AGENT_UNIT])["Service"]["ExecStart"]
    # systemd un-doubles %% everywhere and $$ in the arguments; shlex reads the quoting the same way.
    head, *args = shlex.split(exec_start.replace("%%", "%"))
    assert head == str(binary)
    assert [a.replace("$$", "$") for a in args] == ["--label", 'say "hi" $PATH', "--config", "/etc/rawvm/a b.toml"]


def test_bad_arguments_are_refused() -> None:
    with pytest.raises(ValueError, match="agent executable"):
        render_units(agent_command=[], config_path="/c", max_lifetime=60)
    with pytest.raises(ValueError, match="absolute path"):
        render_units(agent_command=["bin/rawvm-agent"], config_path="/c", max_lifetime=60)
    with pytest.raises(ValueError, match="restart_limit"):
        render_units(agent_command=["rawvm-agent"], config_path="/c", max_lifetime=60, restart_limit=-1)


# -- the power-off step (rawvm_agent.stopper): the agent's own end of the chain -------------------------


async def test_power_off_runs_the_configured_command(tmp_path: Path) -> None:
    marker = tmp_path / "powered-off"
    command = (sys.executable, "-c", f"open({str(marker)!r}, 'w').write('off')")
    await power_off(IdleConfig(poweroff_command=command))
    assert marker.read_text() == "off"


async def test_power_off_failures_raise_for_the_restart_chain(tmp_path: Path) -> None:
    with pytest.raises(PowerOffError, match="exited 3: no permission"):
        await power_off(IdleConfig(poweroff_command=("sh", "-c", "echo no permission; exit 3")))
    with pytest.raises(PowerOffError, match="could not run"):
        await power_off(IdleConfig(poweroff_command=(str(tmp_path / "no-such-poweroff"),)))
    with pytest.raises(PowerOffError, match="still running"):
        await power_off(IdleConfig(poweroff_command=("sleep", "30")), timeout=0.5)


def test_empty_command_ends_the_agent_process_cleanly() -> None:
    """The local provider's 'machine' is the agent process: power_off signals it to exit (SIGTERM), which
    an asyncio agent handles as a clean shutdown."""
    script = """
import asyncio, signal
from rawvm_agent.config import IdleConfig
from rawvm_agent.stopper import power_off

from tests.systools import need_tool

async def main():
    done = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, done.set)
    await power_off(IdleConfig(poweroff_command=()))
    await asyncio.wait_for(done.wait(), 30)
    print("exited on SIGTERM")

asyncio.run(main())
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 0 and result.stdout.strip() == "exited on SIGTERM", result
    bare = subprocess.run(
        [
            sys.executable,
            "-c",
            "import asyncio\nfrom rawvm_agent.config import IdleConfig\n"
            "from rawvm_agent.stopper import power_off\nasyncio.run(power_off(IdleConfig(poweroff_command=())))\n"
            "import time; time.sleep(30)",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert bare.returncode == -signal.SIGTERM  # no handler: the process simply ends
