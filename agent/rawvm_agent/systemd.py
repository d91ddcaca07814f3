"""The systemd units that make a VM turn itself off even when the agent dies: the dead-man chain.

The bootstrap renders these on the laptop (they go into the user-data) and cloud-init installs them in
``/etc/systemd/system``, then enables and starts ``ENABLE`` in that order. The chain, outermost last:

1. ``rawvm-agent.service`` (``Type=notify``): the agent stops the VM itself after ``keepalive`` of idleness.
   It crashes or is SIGKILLed → ``Restart=on-failure`` starts it again after ``RestartSec``; the agent
   reloads its state file, so the idle clock resumes instead of restarting. A clean exit that systemd did
   not ask for (a stray SIGTERM) restarts it as well (``RestartForceExitStatus=``): the agent may only end
   for good by powering the machine off, or by an explicit ``systemctl stop``.
2. It hangs (event loop stuck, or the process SIGSTOPped) → it stops sending ``WATCHDOG=1`` → after
   ``WatchdogSec`` systemd kills it with SIGABRT and SIGCONT (result ``watchdog``), with SIGKILL
   ``TimeoutAbortSec`` later if it still has not exited → step 1.
3. It keeps failing: more than ``restart_limit`` restarts within ``StartLimitIntervalSec`` → the start limit
   is hit, the unit enters ``failed`` → ``OnFailure=rawvm-poweroff.service``. Since systemd 239, OnFailure=
   fires only once the restart logic gives up, never on a failure that is followed by a restart.
4. ``rawvm-poweroff.service`` runs ``systemctl poweroff``; if that fails, ``FailureAction=poweroff-force``
   makes PID 1 power off by itself. It has ``DefaultDependencies=no``: a unit that conflicts with
   ``shutdown.target`` could, when started during a shutdown, cancel that shutdown.
5. Whatever happens to all of the above (agent wedged but still feeding the watchdog, units broken, an
   agent that crashes slower than the start limit counts): two backstops armed at boot, independent of
   the agent, fire at ``max_lifetime + grace`` — ``rawvm-backstop.timer`` (PID 1's own timer, needs nothing
   else) starts ``rawvm-poweroff.service``, and ``rawvm-backstop.service`` schedules ``shutdown -P +N``
   through logind.

Requires systemd >= 239 (bare command names in ExecStart=, OnFailure= semantics above).
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence

AGENT_UNIT = "rawvm-agent.service"
POWEROFF_UNIT = "rawvm-poweroff.service"
BACKSTOP_SERVICE = "rawvm-backstop.service"
BACKSTOP_TIMER = "rawvm-backstop.timer"
# What cloud-init enables and starts, in this order: the backstops first, so they hold even if the agent
# never comes up.
ENABLE = (BACKSTOP_TIMER, BACKSTOP_SERVICE, AGENT_UNIT)
UNIT_DIR = "/etc/systemd/system"

DEFAULT_WATCHDOG = 60.0  # seconds; the agent pings every half of it from its event loop
DEFAULT_RESTART_DELAY = 5.0
DEFAULT_START_TIMEOUT = 300.0  # import + state reload + READY=1, on a slow (emulated) VM
DEFAULT_STOP_TIMEOUT = 120.0  # SIGTERM → exit; bounded so a stuck agent cannot hold up a power-off for long
# After a watchdog timeout systemd sends SIGABRT (with SIGCONT, so a stopped agent dies of it too). An agent that
# still does not exit (stuck in a signal handler, say) gets SIGKILL after this, not after the whole TimeoutStopSec.
DEFAULT_ABORT_TIMEOUT = 30.0
DEFAULT_START_LIMIT_INTERVAL = 1800.0  # restart_limit failures within this window → power off

_HEADER = "# Rendered by rawvm_agent.systemd; the dead-man chain is described in docs/architecture.md.\n"
_SAFE_ARG = re.compile(r"[A-Za-z0-9_@+=:,./-]+")


def render_units(
    *,
    agent_command: Sequence[str],
    config_path: str,
    max_lifetime: float,
    grace: float = 600,
    restart_limit: int = 5,
    watchdog: float = DEFAULT_WATCHDOG,
    restart_delay: float = DEFAULT_RESTART_DELAY,
    start_limit_interval: float = DEFAULT_START_LIMIT_INTERVAL,
) -> dict[str, str]:
    """Unit file name → content for the agent service, the power-off unit and the two backstops.

    ``agent_command`` is the agent executable and any leading arguments (``--config config_path`` is
    appended). ``restart_limit`` counts restarts after the first start.
    """
    if not agent_command:
        raise ValueError("agent_command must name the agent executable")
    if restart_limit < 0:
        raise ValueError(f"restart_limit must be >= 0, got {restart_limit}")
    if watchdog <= 0 or restart_delay < 0 or max_lifetime <= 0 or grace < 0:
        raise ValueError("watchdog and max_lifetime must be positive, restart_delay and grace not negative")
    # Every start (the first and each restart) counts; the burst must fit in the window, or a crash loop
    # would never exhaust it.
    burst = restart_limit + 1
    interval = max(start_limit_interval, burst * (restart_delay + 1.0) * 2)
    exec_start = _command_line([*agent_command, "--config", config_path])
    agent = f"""{_HEADER}[Unit]
Description=rawvm agent: runs the work, powers this machine off when idle
Wants=network-online.target
After=network-online.target
# Restarts exhausted (start limit hit) or any other final failure: power off.
OnFailure={POWEROFF_UNIT}
StartLimitIntervalSec={_seconds(interval)}
StartLimitBurst={burst}

[Service]
Type=notify
NotifyAccess=main
ExecStart={exec_start}
Restart=on-failure
# A clean exit systemd did not ask for (a stray SIGTERM from a task, say) restarts the agent too. When the
# agent powered the machine off, systemd's stop job is already pending and it is not restarted.
RestartForceExitStatus=0 SIGTERM SIGINT SIGHUP SIGPIPE
RestartSec={_seconds(restart_delay)}
WatchdogSec={_seconds(watchdog)}
TimeoutStartSec={_seconds(DEFAULT_START_TIMEOUT)}
TimeoutStopSec={_seconds(DEFAULT_STOP_TIMEOUT)}
TimeoutAbortSec={_seconds(DEFAULT_ABORT_TIMEOUT)}
# A task the kernel OOM-kills ends as that task's failure; it must not stop the agent with it.
OOMPolicy=continue

[Install]
WantedBy=multi-user.target
"""
    poweroff = f"""{_HEADER}[Unit]
Description=rawvm dead-man switch: power this machine off
# No implicit Conflicts=shutdown.target: starting this during a shutdown must not cancel it.
DefaultDependencies=no
# If systemctl poweroff itself fails, PID 1 powers off on its own.
FailureAction=poweroff-force

[Service]
Type=oneshot
ExecStart=systemctl poweroff
"""
    minutes = _backstop_minutes(max_lifetime, grace)
    backstop_timer = f"""{_HEADER}[Unit]
Description=rawvm backstop: power off {minutes} minutes after boot, whatever the agent does

[Timer]
OnBootSec={minutes}min
AccuracySec=1min
Unit={POWEROFF_UNIT}

[Install]
WantedBy=timers.target
"""
    backstop_service = f"""{_HEADER}[Unit]
Description=rawvm backstop: schedule shutdown -P +{minutes} through logind at boot
After=systemd-logind.service dbus.service

[Service]
Type=oneshot
RemainAfterExit=yes
ExecStart={_command_line(render_backstop_command(max_lifetime, grace))}

[Install]
WantedBy=multi-user.target
"""
    return {
        AGENT_UNIT: agent,
        POWEROFF_UNIT: poweroff,
        BACKSTOP_TIMER: backstop_timer,
        BACKSTOP_SERVICE: backstop_service,
    }


def render_backstop_command(max_lifetime: float, grace: float = 600) -> list[str]:
    """``shutdown -P +N``: power off N minutes from now, N = (max_lifetime + grace) in minutes, rounded up."""
    return ["shutdown", "-P", f"+{_backstop_minutes(max_lifetime, grace)}"]


def _backstop_minutes(max_lifetime: float, grace: float) -> int:
    return max(1, math.ceil((max_lifetime + grace) / 60.0))


def _seconds(value: float) -> str:
    """A systemd time span; whole seconds render without a fraction."""
    return f"{int(value)}s" if float(value).is_integer() else f"{value:.3f}s"


def _command_line(argv: Sequence[str]) -> str:
    """Quote argv for ExecStart= (systemd.service(5), "Command lines")."""
    head = argv[0]
    if not head or head[0] in "@-:+!" or not (head.startswith("/") or "/" not in head):
        raise ValueError(f"the executable must be an absolute path or a bare name, got {head!r}")
    return " ".join(_quote_arg(arg, expands=index > 0) for index, arg in enumerate(argv))


def _quote_arg(arg: str, *, expands: bool) -> str:
    # % starts a specifier in every word; $ a variable expansion in the arguments only, not in the
    # executable path (checked against systemd-analyze verify). Doubling makes them literal.
    escaped = arg.replace("%", "%%")
    if expands:
        escaped = escaped.replace("$", "$$")
    if _SAFE_ARG.fullmatch(arg) and arg != ";":
        return escaped
    escaped = escaped.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n").replace("\t", "\\t")
    return f'"{escaped}"'
