"""One ``rawvm top`` client following N simulated agents on loopback: its CPU share of one core and its memory.

    uv run python bench/follow.py [--n 50,200,500] [--seconds 20] [--gpus 8]

Simulated agents: aiohttp servers (in ``--server-procs`` processes of their own, one port per agent) that append
a real sample frame every second to a ring per agent and serve ``/v1/samples?after=SEQ`` (msgpack, the agent's
own frame layout and query), ``/v1/status`` and ``/v1/tasks`` as the agent does. The frame is the real agent
Sampler's, taken once on this machine with 8 GPUs from the tests' fake NVML library (``--gpus 0``: none).

Every simulated agent serves twice: plain HTTP on one port, and the agent's own mutual TLS (``server_ssl_context``
with a per-run cluster CA; the client pins it and presents its certificate) on another. Side by side for each N,
in a client process of its own, measured over the same window after a warm-up:

- **rawvm top**: the real ``rawvm.observe.top.Follower`` (samples by seq, status every second, tasks on change, one
  bounded session) plus ``rawvm.cli.top.render`` of a 200x50 screen every second, as the live view does; over
  mutual TLS, as rawvm only speaks it;
- **bare poller** (the baseline): the least any HTTP follower can do, one aiohttp loop per agent fetching
  the newest sample (``/v1/samples?newest=1&limit=1``) every second over the same kind of session, unparsed;
  once over plain HTTP and once over mutual TLS (**bare mTLS**). Their difference is the channel's own cost
  per answer (asyncio's TLS transport, record encryption; the handshakes happen once, connections are kept).

rawvm top itself speaks only mutual TLS now. Its plaintext figure comes from this bench at a commit before the
channel (``git archive f072476 | tar -x -C OLD``, then ``PYTHONPATH=OLD/bootstrap:OLD/agent:OLD/resolver:OLD/images:OLD
python OLD/bench/follow.py`` with this venv), run back to back on the same machine. Goal (security issue):
following 500 agents over mutual TLS costs at most 1.3x the CPU of plaintext.

CPU share = the client process's user+system CPU-seconds / wall seconds (1.0 = one core busy); RSS = its peak
resident memory (VmHWM). ``looks/s`` says how many agent answers per second the client got; N is the full
rate. Where the simulated agents could not keep up (a loaded machine), the client did less work than a real
cluster would ask, so ``at 1 Hz`` scales its share to N looks a second, and the goal is checked on the larger.
Goal (issue 10): 500 agents under 50 % of one core.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import socket
import ssl
import subprocess
import sys
import tempfile
import time
from collections import deque
from pathlib import Path
from typing import Any

import msgpack

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
TOKEN = "bench-follow-token-4c1a"
RING = 120
TLS_OFFSET = 1  # an agent's mutual-TLS port is its plain port + 1 (``tls_ports`` keeps both free)


def tls_ports(n: int) -> list[int]:
    """``n`` ports p with p and p + TLS_OFFSET both free (found by binding, then released)."""
    socks: list[socket.socket] = []
    ports: list[int] = []
    while len(ports) < n:
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        socks.append(s)
        port = s.getsockname()[1]
        twin = socket.socket()
        try:
            twin.bind(("127.0.0.1", port + TLS_OFFSET))
        except OSError:
            twin.close()
            continue
        socks.append(twin)
        ports.append(port)
    for s in socks:
        s.close()
    return ports


def template_sample(gpus: int) -> dict[str, Any]:
    """One real sample from the agent's Sampler on this machine (8 fake-NVML GPUs unless gpus == 0)."""
    from rawvm_agent.config import TelemetryConfig
    from rawvm_agent.telemetry import Sampler

    from tests.agent.test_nvml_fakelib import eight_gpus, installed

    with tempfile.TemporaryDirectory() as tmp:
        if gpus:
            with installed(eight_gpus()):
                sampler = Sampler(TelemetryConfig(), Path(tmp))
                sampler.sample_once()
                time.sleep(0.2)
                sample = sampler.sample_once()
                sampler.close()
        else:
            sampler = Sampler(TelemetryConfig(), Path(tmp))
            sampler.sample_once()
            time.sleep(0.2)
            sample = sampler.sample_once()
            sampler.close()
    return sample


# -- the simulated agents ------------------------------------------------------------------------------------


def agent_tls(tls_root: Path) -> ssl.SSLContext:
    """The simulated agents' server context: the real agent's mutual TLS."""
    from rawvm_agent.config import AgentConfig
    from rawvm_agent.server import server_ssl_context

    agent = tls_root / "agent"
    return server_ssl_context(
        AgentConfig(tls_cert=str(agent / "agent.crt"), tls_key=str(agent / "agent.key"), tls_ca=str(agent / "ca.crt"))
    )


async def serve(ports: list[int], sample: dict[str, Any], ready: Path, tls_root: Path) -> None:
    """Every agent on ``port`` (plain HTTP) and on ``port + TLS_OFFSET`` (mutual TLS) alike."""
    from aiohttp import web
    from rawvm_agent.telemetry.sample import array_header

    rings: dict[int, deque[tuple[int, bytes]]] = {p: deque(maxlen=RING) for p in ports}
    seqs = dict.fromkeys(ports, 0)
    started = time.time()
    status = {
        "phase": "busy",
        "idle": {"idle": False, "idle_since": None, "idle_seconds": 0.0, "keepalive_s": 1200.0},
        "tasks": {"running": 1, "exited": 0, "ids": ["t1"]},
        "gpu_count": len(sample.get("gpu", [])),
        "started_at": started,
    }
    status_body = json.dumps(status).encode()
    tasks_body = json.dumps([{"id": "t1", "argv": ["python", "train.py"], "state": "running"}]).encode()

    def tick() -> None:
        now = round(time.time(), 3)
        for port in ports:
            seqs[port] += 1
            frame = msgpack.packb({**sample, "seq": seqs[port], "t": now}, use_bin_type=True)
            rings[port].append((seqs[port], frame))

    def port_of(request: web.Request) -> int:
        port = int(request.transport.get_extra_info("sockname")[1])  # type: ignore[union-attr]
        return port if port in rings else port - TLS_OFFSET

    async def samples(request: web.Request) -> web.Response:
        ring = rings[port_of(request)]
        after = int(request.query.get("after", "-1"))
        limit = int(request.query.get("limit", "3600"))
        frames = [f for s, f in ring if s > after]
        frames = frames[-limit:] if request.query.get("newest") == "1" else frames[:limit]
        body = bytearray(array_header(len(frames)))
        for frame in frames:
            body += frame
        return web.Response(body=bytes(body), content_type="application/msgpack")

    async def status_handler(_: web.Request) -> web.Response:
        return web.Response(body=status_body, content_type="application/json")

    async def tasks_handler(_: web.Request) -> web.Response:
        return web.Response(body=tasks_body, content_type="application/json")

    app = web.Application()
    app.router.add_get("/v1/samples", samples)
    app.router.add_get("/v1/status", status_handler)
    app.router.add_get("/v1/tasks", tasks_handler)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    context = agent_tls(tls_root)
    for port in ports:
        await web.TCPSite(runner, "127.0.0.1", port, backlog=512).start()
        await web.TCPSite(runner, "127.0.0.1", port + TLS_OFFSET, backlog=512, ssl_context=context).start()
    tick()
    ready.write_text("ok")
    loop = asyncio.get_running_loop()
    deadline = loop.time()
    while True:
        deadline += 1.0
        await asyncio.sleep(max(0.0, deadline - loop.time()))
        tick()


# -- the clients ---------------------------------------------------------------------------------------------


def peak_rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return 0.0


def cpu_seconds() -> float:
    t = os.times()
    return t.user + t.system


async def client_top(ports: list[int], warmup: float, seconds: float, tls_root: Path) -> dict[str, float]:
    from rawvm.cli.top import render
    from rawvm.clusters import ClusterRecord
    from rawvm.observe.top import Follower
    from rawvm.providers.base import Machine
    from rich.console import Console

    machines = [
        Machine(
            id=f"bench-m{i}",
            provider="aws",
            cluster="bench",
            agent_url=f"https://127.0.0.1:{p + TLS_OFFSET}",
            price_per_hour=3.0,
        )
        for i, p in enumerate(ports)
    ]
    laptop = str(tls_root / "laptop")
    record = ClusterRecord(name="bench", provider="aws", token=TOKEN, machines=machines, channel_dir=laptop)
    console = Console(file=io.StringIO(), width=200, height=50, color_system="truecolor", force_terminal=True)
    async with Follower([record]) as follower:
        follow = asyncio.create_task(follower.run())

        def seqs() -> int:
            return follower.answers

        async def draw_until(end: float) -> None:
            while time.monotonic() < end:
                console.file = io.StringIO()
                console.print(render(follower.views, time.time(), 50))
                await asyncio.sleep(1.0 - time.time() % 1.0)

        await draw_until(time.monotonic() + warmup)
        cpu0, wall0, seq0 = cpu_seconds(), time.monotonic(), seqs()
        await draw_until(time.monotonic() + seconds)
        cpu1, wall1, seq1 = cpu_seconds(), time.monotonic(), seqs()
        answering = sum(1 for v in follower.views if v.answering)
        follow.cancel()
        await asyncio.gather(follow, return_exceptions=True)
    return {
        "cpu_share": (cpu1 - cpu0) / (wall1 - wall0),
        "rss_mb": peak_rss_mb(),
        "looks_per_s": (seq1 - seq0) / (wall1 - wall0),
        "answering": answering,
    }


async def client_bare(ports: list[int], warmup: float, seconds: float, tls_root: Path | None) -> dict[str, float]:
    """The bare poller; over mutual TLS (the laptop's context, as rawvm makes it) when ``tls_root`` is given."""
    import aiohttp
    from rawvm.agent.tls import ChannelFiles, client_context

    context = client_context(ChannelFiles(tls_root / "laptop")) if tls_root is not None else None
    scheme, offset = ("https", TLS_OFFSET) if context is not None else ("http", 0)

    headers = {"Authorization": f"Bearer {TOKEN}"}
    received = 0
    counting = False

    async def follow(session: aiohttp.ClientSession, port: int) -> None:
        nonlocal received
        loop = asyncio.get_running_loop()
        params = {"after": "-1", "limit": "1", "newest": "1"}  # the newest sample, unparsed: the least work
        while True:
            started = loop.time()
            try:
                url = f"{scheme}://127.0.0.1:{port + offset}/v1/samples"
                async with session.get(url, params=params, headers=headers, ssl=context or True) as r:
                    body = await r.read()
                if len(body) > 1 and counting:
                    received += 1
            except (TimeoutError, aiohttp.ClientError):
                pass
            await asyncio.sleep(max(0.0, started + 1.0 - loop.time()))

    connector = aiohttp.TCPConnector(limit=64, limit_per_host=2, keepalive_timeout=30)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=3)) as session:
        tasks = [asyncio.create_task(follow(session, p)) for p in ports]
        await asyncio.sleep(warmup)
        counting = True
        cpu0, wall0 = cpu_seconds(), time.monotonic()
        await asyncio.sleep(seconds)
        cpu1, wall1 = cpu_seconds(), time.monotonic()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    return {
        "cpu_share": (cpu1 - cpu0) / (wall1 - wall0),
        "rss_mb": peak_rss_mb(),
        "looks_per_s": received / (wall1 - wall0),
    }


# -- the orchestration ---------------------------------------------------------------------------------------


def run_case(n: int, sample_file: Path, tls_root: Path, args: argparse.Namespace) -> dict[str, dict[str, float]]:
    ports = tls_ports(n)
    groups = [ports[i :: args.server_procs] for i in range(args.server_procs)]
    servers = []
    with tempfile.TemporaryDirectory() as tmp:
        for i, group in enumerate(groups):
            ready = Path(tmp) / f"ready-{i}"
            servers.append(
                (
                    subprocess.Popen(
                        [
                            sys.executable,
                            __file__,
                            "serve",
                            str(sample_file),
                            str(ready),
                            ",".join(map(str, group)),
                            str(tls_root),
                        ]
                    ),
                    ready,
                )
            )
        try:
            deadline = time.monotonic() + 120
            while not all(r.exists() for _, r in servers):
                if time.monotonic() > deadline:
                    raise SystemExit("the simulated agents did not start")
                time.sleep(0.2)
            out = {}
            for mode in ("bare", "bare-tls", "top"):
                result = subprocess.run(
                    [
                        sys.executable,
                        __file__,
                        "client",
                        mode,
                        str(args.warmup),
                        str(args.seconds),
                        ",".join(map(str, ports)),
                        str(tls_root),
                    ],
                    capture_output=True,
                    text=True,
                    check=True,
                )
                out[mode] = json.loads(result.stdout.strip().splitlines()[-1])
            return out
        finally:
            for proc, _ in servers:
                proc.terminate()
                proc.wait(timeout=30)


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "serve":
        sample = json.loads(Path(sys.argv[2]).read_text())
        asyncio.run(serve([int(p) for p in sys.argv[4].split(",")], sample, Path(sys.argv[3]), Path(sys.argv[5])))
        return
    if len(sys.argv) > 1 and sys.argv[1] == "client":
        mode, warmup, seconds, ports = sys.argv[2], float(sys.argv[3]), float(sys.argv[4]), sys.argv[5]
        tls_root, numbers = Path(sys.argv[6]), [int(p) for p in ports.split(",")]
        if mode == "top":
            result = asyncio.run(client_top(numbers, warmup, seconds, tls_root))
        else:
            result = asyncio.run(client_bare(numbers, warmup, seconds, tls_root if mode == "bare-tls" else None))
        print(json.dumps(result))
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", default="50,200,500", help="agent counts (%(default)s)")
    parser.add_argument("--seconds", type=float, default=20.0, help="measured window per client (%(default)s)")
    parser.add_argument("--warmup", type=float, default=5.0, help="seconds before measuring (%(default)s)")
    parser.add_argument("--gpus", type=int, default=8, choices=(0, 8), help="GPUs in each sample (%(default)s)")
    parser.add_argument("--server-procs", type=int, default=2, help="processes serving the agents (%(default)s)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        sample_file = Path(tmp) / "sample.json"
        from tests.helpers.tls import make_test_channel

        tls_root = Path(tmp) / "tls"
        make_test_channel(tls_root, "bench")
        sample = template_sample(args.gpus)
        sample_file.write_text(json.dumps(sample))
        frame = len(msgpack.packb(sample, use_bin_type=True))
        print(f"sample frame: {frame} bytes ({len(sample.get('gpu', []))} GPUs); window {args.seconds:g} s")
        print(
            f"{'N':>5} | {'client':<12} | {'CPU, one core':>13} | {'at 1 Hz':>7} | {'peak RSS':>9} | "
            f"{'looks/s':>8} | ratio (at 1 Hz)"
        )
        for n in [int(x) for x in args.n.split(",")]:
            res = run_case(n, sample_file, tls_root, args)
            bare, bare_tls, top = res["bare"], res["bare-tls"], res["top"]
            for r in (bare, bare_tls, top):
                # What the share would be if every agent had answered every second (a loaded machine's simulated
                # agents may not keep up: then the client did less work than a real cluster would ask of it).
                r["at_1hz"] = r["cpu_share"] * n / r["looks_per_s"] if r["looks_per_s"] else float("nan")
            for name, r in (("bare poller", bare), ("bare mTLS", bare_tls), ("rawvm top", top)):
                ratio = f"{r['at_1hz'] / bare['at_1hz']:.2f}x CPU" if name != "bare poller" else "baseline"
                print(
                    f"{n:>5} | {name:<12} | {100 * r['cpu_share']:>12.1f}% | {100 * r['at_1hz']:>6.1f}% | "
                    f"{r['rss_mb']:>6.1f} MB | {r['looks_per_s']:>8.1f} | {ratio}",
                    flush=True,
                )
            added = 100 * (bare_tls["at_1hz"] - bare["at_1hz"])
            print(f"the channel's own cost at {n} agents (bare mTLS - bare poller): {added:.1f}% of one core at 1 Hz")
            if n == 500:
                worst = max(top["cpu_share"], top["at_1hz"])
                goal = "meets" if worst < 0.5 else "MISSES"
                print(f"goal: 500 agents under 50% of one core: {goal} ({100 * worst:.1f}% at most)")


if __name__ == "__main__":
    main()
