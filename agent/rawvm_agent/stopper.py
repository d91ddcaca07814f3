"""The last step of the stop sequence: power the machine off.

``idle.poweroff_command`` (default ``systemctl poweroff``) runs as given. When it is empty (the local
provider, where the "machine" is the agent process) the agent sends itself SIGTERM, which its event loop
handles as a clean exit. Either way the caller just waits afterwards: systemd or the signal ends it.

A command that cannot run, fails, or hangs raises ``PowerOffError``. The agent must then exit non-zero
rather than carry on: systemd restarts it, the restarted agent decides to stop again, and when restarts
are exhausted ``OnFailure=rawvm-poweroff.service`` powers off (see ``rawvm_agent.systemd``).
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal

from rawvm_agent.config import IdleConfig

log = logging.getLogger(__name__)

COMMAND_TIMEOUT = 60.0  # systemctl poweroff returns once the job is queued; a minute means it is stuck


class PowerOffError(RuntimeError):
    """The power-off command could not run, failed, or hung; the message says which."""


async def power_off(config: IdleConfig, *, timeout: float = COMMAND_TIMEOUT) -> None:
    command = list(config.poweroff_command)
    if not command:
        log.warning("no power-off command configured: ending the agent process (SIGTERM to itself)")
        os.kill(os.getpid(), signal.SIGTERM)
        return
    log.warning("powering off: %s", " ".join(command))
    try:
        process = await asyncio.create_subprocess_exec(
            *command, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
        )
    except OSError as exc:
        raise PowerOffError(f"power-off command {command[0]!r} could not run: {exc}") from exc
    try:
        output, _ = await asyncio.wait_for(process.communicate(), timeout)
    except TimeoutError:
        process.kill()
        await process.wait()
        raise PowerOffError(f"power-off command {' '.join(command)!r} still running after {timeout:g}s") from None
    if process.returncode != 0:
        detail = output.decode(errors="replace").strip()[-500:]
        raise PowerOffError(f"power-off command {' '.join(command)!r} exited {process.returncode}: {detail}")
    log.info("power-off command done; waiting for the machine to go down")
