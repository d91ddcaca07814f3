"""``rawvm notebook``: JupyterLab on a machine, reached through the agent's API, the project kept in sync.

A new machine is locked with JupyterLab added when the environment lacks it (``extra_requirements``: the lock
keeps the environment's own JupyterLab when it has one); ``--cluster NAME`` reuses a machine, whose environment
must have it. JupyterLab runs as a task bound to the machine's 127.0.0.1 on a port free there, with a random
token passed as a secret (``JUPYTER_TOKEN``: masked in the task's logs, in no process listing). The laptop serves
it on its own 127.0.0.1 through ``forward.listen`` (each browser connection one websocket over the mutual-TLS
channel: nothing is opened in any security group) and keeps the project in sync both ways (``sync``).

The attached laptop holds a ``GET /v1/sync`` session that owns the JupyterLab task: when the session ends (Ctrl-C,
or a laptop that vanished and stopped answering the heartbeat) the agent cancels the task, so neither a kernel
nor the server keeps the machine busy after the person has gone, and it idles off after its keepalive.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import re
import secrets
import time
import webbrowser
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

import aiohttp
from rawvm_agent.wsframes import send_json

from rawvm import clusters
from rawvm.agent.client import AgentClient, AgentError
from rawvm.errors import RawvmError
from rawvm.interactive.forward import listen
from rawvm.interactive.sync import TwoWaySync, watching
from rawvm.interactive.target import machine_client
from rawvm.launch import launch
from rawvm.options import LaunchOptions
from rawvm.session import Launched, provider_of, ready_or_fail, stops_line

JUPYTERLAB = ("jupyterlab>=4", "rawvm notebook: JupyterLab on the machine")
START_TIMEOUT_S = 180.0  # from the task's start until JupyterLab answers
STOP_GRACE_S = 10.0  # JupyterLab shuts its kernels down on SIGTERM (they run in their own process groups)
MISSING_EXIT = 3

# Runs in the machine's environment: checks JupyterLab is there, picks a free loopback port, says it, and becomes
# JupyterLab (exec: the task's process is the server, so cancelling the task stops it and its kernels).
LAUNCHER = f"""
import os, socket, sys
try:
    import jupyterlab
except ImportError:
    print("RAWVM_NOTEBOOK missing", flush=True)
    sys.exit({MISSING_EXIT})
s = socket.socket()
s.bind(("127.0.0.1", 0))
port = s.getsockname()[1]
s.close()
print(f"RAWVM_NOTEBOOK port={{port}}", flush=True)
os.execv(sys.executable, [sys.executable, "-m", "jupyterlab", "--no-browser", "--ip=127.0.0.1",
    f"--port={{port}}", "--ServerApp.port_retries=0", "--ServerApp.root_dir=.", "--allow-root",
    "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate"])
"""
_PORT_LINE = re.compile(rb"RAWVM_NOTEBOOK port=([0-9]+)")


def cluster_for_notebook(options: LaunchOptions) -> clusters.ClusterRecord:
    """The cluster ``--cluster`` names, or a new one launched with JupyterLab in its environment (and ready)."""
    if options.cluster and clusters.exists(options.cluster):
        record = clusters.load(options.cluster)
        # a machine that is up answers at once; a short wait tells a stopped cluster quickly (as run --cluster)
        launched = Launched(provider=provider_of(record), record=record, timings={}, ready_timeout_s=30.0)
    else:
        env = options.environment
        environment = dataclasses.replace(env, extra_requirements=(*env.extra_requirements, JUPYTERLAB))
        launched = launch(options.replace(environment=environment))
    ready_or_fail(launched)
    return launched.record


async def _jupyter_port(client: AgentClient, task_id: str, cluster: str) -> int:
    """The port the launcher picked, once it says it; a RawvmError with the reason when the task ends first."""
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        out, _ = await client.logs(task_id)
        if match := _PORT_LINE.search(out):
            return int(match[1])
        record = await client.task(task_id)
        if record.get("exit_code") is not None or record.get("state") not in ("running", "pending", None):
            if b"RAWVM_NOTEBOOK missing" in out:
                raise RawvmError(
                    f"cluster {cluster}'s environment has no JupyterLab: run 'rawvm notebook' without --cluster "
                    "(the lock adds it), or add jupyterlab to the environment and launch again"
                )
            err, _ = await client.logs(task_id, stream="stderr")
            raise RawvmError(f"JupyterLab did not start: {err.decode(errors='replace').strip()[-500:]}")
        await asyncio.sleep(0.3)
    raise RawvmError(f"JupyterLab did not start within {START_TIMEOUT_S:.0f} s")


async def _wait_serving(client: AgentClient, task_id: str, remote: int, local: int, token: str) -> None:
    """Until JupyterLab answers its API through the forward (probing the machine's port quietly first)."""
    deadline = time.monotonic() + START_TIMEOUT_S
    while True:
        try:
            async with client.websocket("/v1/forward", params={"port": str(remote)}):
                break
        except AgentError as exc:
            record = await client.task(task_id)
            if exc.status != 502 or record.get("exit_code") is not None or time.monotonic() > deadline:
                err, _ = await client.logs(task_id, stream="stderr")
                raise RawvmError(f"JupyterLab did not start: {err.decode(errors='replace').strip()[-500:]}") from None
        await asyncio.sleep(0.3)
    url = f"http://127.0.0.1:{local}/api/status"
    async with aiohttp.ClientSession(headers={"Authorization": f"token {token}"}) as http:
        while True:
            try:
                async with http.get(url, timeout=aiohttp.ClientTimeout(total=10)) as resp:
                    if resp.status == 200:
                        return
            except (aiohttp.ClientError, TimeoutError):
                pass
            if time.monotonic() > deadline:
                raise RawvmError(f"JupyterLab did not answer through the forward within {START_TIMEOUT_S:.0f} s")
            await asyncio.sleep(0.3)


async def _task_ended(client: AgentClient, task_id: str) -> None:
    """Raises once the JupyterLab task has ended by itself (then there is nothing left to attach to)."""
    while True:
        await asyncio.sleep(2.0)
        with_code = await client.task(task_id)
        if with_code.get("exit_code") is not None:
            raise RawvmError(f"JupyterLab on the machine ended (exit code {with_code['exit_code']})")


async def attach(
    cluster: str, project: Path, port: int, open_browser: bool, say: Callable[[str], None], show: Callable[[str], None]
) -> None:
    """Start JupyterLab on the cluster's first machine, serve it on ``127.0.0.1:port``, show its URL and keep
    ``project`` in sync, until cancelled (Ctrl-C); the JupyterLab task is cancelled however this ends."""
    async with machine_client(cluster) as (mid, client):
        token = secrets.token_urlsafe(24)
        async with client.websocket("/v1/sync") as sync_ws:
            task_id = await client.submit(
                ["python", "-c", LAUNCHER], env={"JUPYTER_TOKEN": token}, secret_env=["JUPYTER_TOKEN"]
            )
            try:
                await send_json(sync_ws, {"owns": task_id})  # the agent cancels it if this laptop vanishes
                remote = await _jupyter_port(client, task_id, cluster)
                server = await listen(client, port, remote, say)
                async with server:
                    local = int(server.sockets[0].getsockname()[1])
                    sync = TwoWaySync(client, sync_ws, project, say)
                    counts = await sync.round()
                    say(f"sync: {project} and {mid}'s work dir agree ({counts.sent} sent, {counts.received} received)")
                    await _wait_serving(client, task_id, remote, local, token)
                    url = f"http://127.0.0.1:{local}/lab?token={token}"
                    say(f"JupyterLab on {mid} of {cluster}, syncing {project} both ways; Ctrl-C detaches")
                    show(url)
                    if open_browser:
                        webbrowser.open(url)
                    with watching(project, sync.wake):
                        await _first_of(sync.run(), server.serve_forever(), _task_ended(client, task_id))
            finally:
                await asyncio.shield(_stop(client, task_id))


async def _first_of(*jobs: Coroutine[Any, Any, object]) -> None:
    """Run the coroutines together until one ends (its error raised); the others are cancelled."""
    tasks = [asyncio.ensure_future(job) for job in jobs]
    try:
        done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        for task in done:
            task.result()
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def _stop(client: AgentClient, task_id: str) -> None:
    """Cancel the JupyterLab task (the agent also does when the sync session closes: whichever comes first)."""
    with contextlib.suppress(AgentError):
        await client.cancel_task(task_id, grace=STOP_GRACE_S)


def stops_after(cluster: str) -> str:
    """The one line said on detaching."""
    if not clusters.exists(cluster):
        return "notebook closed: JupyterLab stopped"
    return f"notebook closed: JupyterLab stopped; {stops_line(clusters.load(cluster))}"
