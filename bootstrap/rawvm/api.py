"""The front door: ``rawvm.run(...)`` and friends. Lock, stage, launch, then speak only the agent API.

Exit code of a run: the task's exit code; with several machines, the largest of them (so any failure shows
as a failure); a task ended by signal N counts as 128 + N. rawvm's own messages go to stderr, the task's
stdout to ``output`` and its stderr to ``error_output``.
"""

from __future__ import annotations

import asyncio
import codecs
import concurrent.futures
import contextlib
import dataclasses
import json
import secrets
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO, TypeVar

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from rawvm_agent.config import AgentConfig, BundleConfig, BundleFile, IdleConfig, InstallConfig, SpotConfig
from rawvm_agent.durations import DurationError, format_duration, parse_duration
from rawvm_resolver.target import DEFAULT_CUDA, DEFAULT_GLIBC, Target, parse_platform

from rawvm import clusters, cost_guard
from rawvm.agent.client import AgentClient, AgentError
from rawvm.agent.userdata import BACKSTOP_GRACE
from rawvm.errors import RawvmError, UsageError
from rawvm.files import sha256_file
from rawvm.progress import MachineProgress, install_detail, make_progress
from rawvm.providers import PROVIDERS, get_provider
from rawvm.providers.base import Machine, MachineSpec, Provider

T = TypeVar("T")
SPOT_POLICIES = ("on-demand", "spot", "spot_with_fallback")
SERVING_PHASES = frozenset({"ready", "busy", "idle"})
ENDED_PHASES = frozenset({"failed", "stopping", "off"})
FREE_PROVIDERS = frozenset({"local", "qemu"})
_DEFAULT_READY_TIMEOUT_S = 1800.0
_POLL_S = 0.25


@dataclass
class RunResult:
    exit_code: int
    machines: list[Machine]
    cost_usd: float  # price_per_hour x wall time, summed over machines; 0.0 for local and qemu
    timings: dict[str, float] = field(default_factory=dict)  # seconds: lock, stage, launch, ready, task, total
    cluster: str = ""


# -- input checks: each bad value gives one line naming the flag and what to do ---------------------------------


def parse_duration_flag(flag: str, value: str) -> float:
    try:
        seconds = parse_duration(value)
    except DurationError:
        raise UsageError(f"{flag} {value!r} is not a duration: use e.g. 90s, 20m, 2h or 1h30m") from None
    if seconds <= 0:
        raise UsageError(f"{flag} must be longer than 0s")
    return seconds


def check_options(
    *, provider: str, n: int, vm_type: str, cpu: int, memory: float, gpu: bool, arm: bool, spot_policy: str
) -> None:
    if provider not in PROVIDERS:
        raise UsageError(f"unknown provider {provider!r}: choose one of {', '.join(PROVIDERS)}")
    if n < 1:
        raise UsageError(f"-n {n}: the number of machines must be at least 1")
    if cpu < 0 or memory < 0:
        raise UsageError("--cpu and --memory must not be negative")
    if vm_type and (cpu or memory or gpu or arm):
        raise UsageError("give either --vm-type or --cpu/--memory/--gpu/--arm, not both")
    if spot_policy not in SPOT_POLICIES:
        raise UsageError(f"unknown spot policy {spot_policy!r}: choose one of {', '.join(SPOT_POLICIES)}")


def check_command(command: Sequence[str]) -> list[str]:
    argv = list(command)
    if argv[:1] == ["--"]:
        argv = argv[1:]
    if not argv:
        raise UsageError("no command to run: put it after '--', e.g. rawvm run -- python script.py")
    return argv


def check_ca_certs(paths: Sequence[str | Path]) -> tuple[Path, ...]:
    out = []
    for raw in paths:
        path = Path(raw).expanduser()
        if not path.is_file() or b"BEGIN CERTIFICATE" not in path.read_bytes():
            raise UsageError(f"--extra-ca-cert {raw}: not a readable PEM certificate file")
        out.append(path.resolve())
    return tuple(out)


# -- the pieces of a launch -------------------------------------------------------------------------------------


def target_for(provider: Provider, spec: MachineSpec) -> Target:
    """The resolver target: the provider's platform, and its glibc and Python where it knows them."""
    arch = parse_platform(provider.target_platform(spec))
    glibc_of: Callable[[], str] | None = getattr(provider, "target_glibc", None)
    python_of: Callable[[], str] | None = getattr(provider, "target_python", None)
    python = python_of() if python_of is not None else ""  # "": the resolver takes the source's Python
    return Target(
        arch=arch,
        python=python,
        glibc=glibc_of() if glibc_of is not None else DEFAULT_GLIBC,
        accelerator="cuda" if spec.gpu else "cpu",
        cuda=DEFAULT_CUDA if spec.gpu else "",
    )


def bundle_files(bundle_dir: Path) -> list[tuple[str, Path]]:
    """Every file of the bundle as ``(relative path, path)``, sorted."""
    return sorted((p.relative_to(bundle_dir).as_posix(), p) for p in bundle_dir.rglob("*") if p.is_file())


def bundle_config(files: Sequence[tuple[str, Path]], urls: dict[str, str], manifest_sha256: str) -> BundleConfig:
    return BundleConfig(
        files=tuple(BundleFile(path=name, url=urls[name], sha256=sha256_file(path)) for name, path in files),
        manifest_sha256=manifest_sha256,
    )


def add_code_files(bundle_dir: Path, archives: Sequence[tuple[str, Path]]) -> str:
    """Copy ``(name, tar.gz)`` archives into the bundle as ``code`` files and list them, with their sha256, in
    its manifest; returns the manifest's new sha256 (the root of trust the agent is given)."""
    import tomllib

    import tomli_w

    manifest_path = bundle_dir / "rawvm-env.toml"
    manifest = tomllib.loads(manifest_path.read_text(encoding="utf-8"))
    entries = [f for f in manifest.get("files", []) if f.get("path") not in {name for name, _ in archives}]
    for name, archive in archives:
        target = bundle_dir / name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(archive, target)
        entries.append({"path": name, "sha256": sha256_file(target), "kind": "code"})
    manifest["files"] = sorted(entries, key=lambda f: str(f["path"]))
    manifest_path.write_text(tomli_w.dumps(manifest), encoding="utf-8")
    return sha256_file(manifest_path)


def lock_summary(rows: Sequence[Any]) -> str:
    """``2 translated, 1 dropped``: what the lock changed against the source, "" when it kept everything."""
    counts: dict[str, int] = {}
    for row in rows:
        if row.action != "kept":
            counts[row.action] = counts.get(row.action, 0) + 1
    return ", ".join(f"{n} {action}" for action, n in sorted(counts.items()))


def _run_sync(coro: Coroutine[Any, Any, T]) -> T:
    """``asyncio.run``, also from code that already runs an event loop (Jupyter): then in a worker thread."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coro)
    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
        return pool.submit(asyncio.run, coro).result()


def _say(message: str) -> None:
    print(f"rawvm: {message}", file=sys.stderr, flush=True)


@dataclass
class _Launched:
    provider: Provider
    record: clusters.ClusterRecord
    timings: dict[str, float]
    ready_timeout_s: float | None = None  # None: the provider's boot allowance


def _locked_bundle(
    source: str | Path | None,
    target: Target,
    dest: Path,
    extra_requirements: Sequence[tuple[str, str]],
    bundle_cache: Path | None,
    project_dir: Path | None = None,
    pypi_only: bool = False,
) -> tuple[Path, str]:
    """Lock ``source`` into ``dest``: the bundle directory and its manifest's sha256. With ``bundle_cache`` (a
    directory named after everything the bundle depends on, as ``@rawvm.function`` keeps them), a bundle already
    there is used as it is, and a fresh one is kept there for the next launch."""
    if bundle_cache is not None and (bundle_cache / "rawvm-env.toml").is_file():
        _say(f"lock: the environment is unchanged, using its bundle from {bundle_cache}")
        return bundle_cache, sha256_file(bundle_cache / "rawvm-env.toml")
    from rawvm_resolver import lock

    locked = lock(
        source,
        target,
        dest,
        progress=_say,
        extra_requirements=extra_requirements,
        project_dir=project_dir,
        pypi_only=pypi_only,
    )
    for warning in locked.warnings:
        _say(f"warning: {warning}")
    asked = {canonicalize_name(Requirement(line).name) for line, _ in extra_requirements}
    for row in locked.rows:
        if row.name in asked and row.action == "added":
            _say(f"lock: added {row.name} {row.target} ({row.reason})")
    if summary := lock_summary(locked.rows):
        _say(f"lock: {summary} (details: rawvm lock --explain)")
    if bundle_cache is not None:
        partial = bundle_cache.with_name(f".{bundle_cache.name}.partial")
        shutil.rmtree(partial, ignore_errors=True)
        shutil.copytree(locked.bundle_dir, partial)
        try:
            partial.rename(bundle_cache)  # whole or not at all: a cut copy never passes for a bundle
        except OSError:
            shutil.rmtree(partial, ignore_errors=True)  # another process kept the same bundle first
    return locked.bundle_dir, locked.manifest_sha256


def _launch(
    *,
    provider_name: str,
    n: int,
    vm_type: str,
    cpu: int,
    memory: float,
    gpu: bool,
    arm: bool,
    region: str,
    keepalive: str,
    max_lifetime: str,
    spot_policy: str,
    source: str | Path | None,
    cluster: str | None,
    extra_ca_certs: Sequence[str | Path],
    pypi_only: bool = False,
    max_cost: float | str | None = "default",
    max_cost_action: str = "",
    extra_requirements: Sequence[tuple[str, str]] = (),
    bundle_cache: Path | None = None,
    project_dir: Path | None = None,
    extra_code: Sequence[tuple[str, Path]] = (),
    open_ports: tuple[int, ...] = (),
    peer_ports: tuple[int, int] | None = None,
    client_timeout: float | None = None,
    check_bundle: Callable[[Path], None] | None = None,
    extra_files: Sequence[tuple[str, Path]] = (),
    amend_agent: Callable[[AgentConfig, dict[str, str]], AgentConfig] | None = None,
) -> _Launched:
    """Lock, stage, launch. ``extra_files`` are staged beside the bundle (e.g. a batch spec), and
    ``amend_agent(agent config, staged URLs)`` adds what they are for to the config every machine gets.
    ``extra_code``: ``(bundle name, tar.gz)`` archives added to the bundle as code (listed
    in its manifest with their sha256, unpacked into the work dir), e.g. a Dask cluster's TLS files;
    ``open_ports``/``peer_ports``: see ``MachineSpec``; ``client_timeout``: how long a keepalive ping keeps a machine
    busy (the agent's default when None); ``check_bundle(bundle_dir)`` may refuse the locked bundle (UsageError)
    before anything is staged or launched."""
    check_options(
        provider=provider_name, n=n, vm_type=vm_type, cpu=cpu, memory=memory, gpu=gpu, arm=arm, spot_policy=spot_policy
    )
    keepalive_s = parse_duration_flag("--keepalive", keepalive)
    lifetime_s = parse_duration_flag("--max-lifetime", max_lifetime)
    project = Path(source) if source is not None and Path(source).is_dir() else Path.cwd()
    cap, cap_action = cost_guard.resolve(max_cost, max_cost_action, project)
    certs = check_ca_certs(extra_ca_certs)
    name = clusters.check_name(cluster) if cluster else clusters.new_name()
    if clusters.exists(name):
        raise UsageError(f"a cluster named {name!r} exists: pick another name or 'rawvm down {name}' first")
    options = {"region": region} if region and provider_name == "aws" else {}  # to find the machines again
    provider = get_provider(provider_name, **options)
    timings: dict[str, float] = {}
    started = time.monotonic()

    from rawvm.agent.wheel import build_agent_wheel

    token = secrets.token_urlsafe(32)
    agent = AgentConfig(
        cluster=name,
        token=token,
        idle=IdleConfig(keepalive=keepalive_s, max_lifetime=lifetime_s)
        if client_timeout is None
        else IdleConfig(keepalive=keepalive_s, max_lifetime=lifetime_s, client_timeout=client_timeout),
        install=InstallConfig(native_tls=bool(certs)),  # extra CAs go into the machine's trust store
        spot=SpotConfig(enabled=spot_policy != "on-demand"),
    )
    spec = MachineSpec(
        cluster=name,
        count=n,
        agent=agent,
        agent_wheel=Path(),  # built below, once the options have passed the provider's checks
        vm_type=vm_type,
        cpu=cpu,
        memory_gib=memory,
        gpu=gpu,
        arm=arm,
        region=region,
        spot_policy=spot_policy,
        extra_ca_certs=certs,
        open_ports=open_ports,
        peer_ports=peer_ports,
    )
    target = target_for(provider, spec)
    # The price before anything slow or billed: a refused launch has locked, staged and started nothing.
    estimate: Callable[[MachineSpec], cost_guard.FleetPrice] | None = getattr(provider, "estimate", None)
    lifetime_s = cost_guard.guard(
        (lambda: estimate(spec)) if estimate is not None else None,
        lifetime_s=lifetime_s,
        grace_s=BACKSTOP_GRACE,
        max_cost=cap,
        action=cap_action,
        say=_say,
    )
    agent = dataclasses.replace(agent, idle=dataclasses.replace(agent.idle, max_lifetime=lifetime_s))
    spec = dataclasses.replace(spec, agent=agent, agent_wheel=build_agent_wheel())
    bundle_root = Path(tempfile.mkdtemp(prefix="rawvm-bundle-"))
    try:
        bundle_dir, manifest_sha256 = _locked_bundle(
            source, target, bundle_root / "bundle", extra_requirements, bundle_cache, project_dir, pypi_only
        )
        timings["lock"] = time.monotonic() - started
        if check_bundle is not None:
            check_bundle(bundle_dir)
        manifest_sha256 = add_code_files(bundle_dir, extra_code) if extra_code else manifest_sha256
        files = bundle_files(bundle_dir)
        record = clusters.ClusterRecord(
            name=name,
            provider=provider_name,
            token=token,
            keepalive_s=keepalive_s,
            max_lifetime_s=lifetime_s,
            provider_options=options,
        )
        clusters.save(record)  # before staging, so 'rawvm down NAME' finds what a failed launch left
        remember_sink_provider(name, provider_name, options)  # 'rawvm logs' reads the sink after the record goes

        def stage_and_launch() -> list[Machine]:
            nonlocal spec
            mark = time.monotonic()
            urls = provider.stage(name, [*files, *extra_files])
            staged = dataclasses.replace(
                agent, bundle=bundle_config(files, urls, manifest_sha256), sink=provider.sink_url(name)
            )
            if amend_agent is not None:
                staged = amend_agent(staged, urls)
            spec = dataclasses.replace(spec, agent=staged)
            timings["stage"] = time.monotonic() - mark
            mark = time.monotonic()
            _say(f"launching {n} {provider_name} machine{'s' if n > 1 else ''} as cluster {name}")
            machines = provider.launch(spec)
            timings["launch"] = time.monotonic() - mark
            return machines

        record.machines = launch_or_release(provider, name, stage_and_launch)
    finally:
        shutil.rmtree(bundle_root, ignore_errors=True)
    clusters.save(record)
    return _Launched(provider=provider, record=record, timings=timings)


def launch_or_release(provider: Provider, cluster: str, launch: Callable[[], list[Machine]]) -> list[Machine]:
    """``launch()`` (staging and launching a new cluster); when it fails, release whatever it left (staged files,
    machines a partial fleet started, security group, launch template) with ``provider.down`` and forget the
    cluster, so a failed launch leaves nothing behind. If releasing fails too, the record stays and the message
    says to run ``rawvm down``."""
    try:
        return launch()
    except RawvmError as exc:
        try:
            provider.down(cluster)
        except RawvmError as cleanup:
            raise RawvmError(
                f"{exc}; releasing what the launch left failed too ({cleanup}): run 'rawvm down {cluster}'"
            ) from None
        clusters.remove(cluster)
        raise type(exc)(f"{exc} (nothing of cluster {cluster} was left running)") from None


# -- talking to the machines ------------------------------------------------------------------------------------


def _provider_of(record: clusters.ClusterRecord) -> Provider:
    return get_provider(record.provider, **record.provider_options)


def _short(machine: Machine) -> str:
    return machine.id.removeprefix(f"{machine.cluster}-")


async def _wait_ready(
    clients: dict[str, AgentClient],
    provider: Provider,
    record: clusters.ClusterRecord,
    view: MachineProgress,
    timeout: float | None = None,
) -> None:
    timeout = float(getattr(provider, "ready_timeout_s", _DEFAULT_READY_TIMEOUT_S)) if timeout is None else timeout
    deadline = time.monotonic() + timeout
    pending = dict(clients)
    alive: Callable[[Machine], bool] | None = getattr(provider, "alive", None)
    by_id = {_short(m): m for m in record.machines}
    billed = record.provider not in FREE_PROVIDERS
    while pending:
        if billed:
            view.cost(_cost_line(record, cost_of(record, time.time())))
        for mid, client in list(pending.items()):
            try:
                status = await client.status()
            except AgentError:
                if alive is not None and not alive(by_id[mid]):
                    raise RawvmError(f"machine {mid} of {record.name} stopped before its agent answered") from None
                view.update(mid, "booting")
                continue
            phase = str(status.get("phase", ""))
            view.update(mid, phase, str(status.get("error") or "") if phase == "failed" else install_detail(status))
            if phase in SERVING_PHASES:
                del pending[mid]
            elif phase in ENDED_PHASES:
                why = status.get("error") or status.get("stop_reason") or phase
                raise RawvmError(f"machine {mid} of {record.name} is {phase}: {why}")
        if pending and time.monotonic() > deadline:
            raise RawvmError(
                f"{', '.join(pending)} not ready after {format_duration(timeout)}: "
                f"see 'rawvm logs {record.name}', stop with 'rawvm down {record.name}'"
            )
        if pending:
            await asyncio.sleep(_POLL_S)


class _StreamWriter:
    """Decodes a machine's output as it comes; with a prefix, writes whole lines ``[m0] ...``."""

    def __init__(self, out: TextIO, prefix: str) -> None:
        self._out, self._prefix = out, prefix
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._pending = ""

    def write(self, data: bytes, final: bool = False) -> None:
        text = self._pending + self._decoder.decode(data, final=final)
        if not self._prefix:
            self._pending = ""
            self._out.write(text)
        else:
            lines = text.split("\n")
            self._pending = "" if final else lines.pop()
            self._out.write("".join(f"{self._prefix}{line}\n" for line in lines if line or not final))
        self._out.flush()

    def close(self) -> None:
        self.write(b"", final=True)


def task_exit_code(record: dict[str, Any]) -> int:
    code = record.get("exit_code")
    if not isinstance(code, int):
        return 1  # the task never ran to an exit (could not start, lost, interrupted)
    return 128 - code if code < 0 else code


async def _run_on(
    mid: str, client: AgentClient, argv: list[str], prefix: str, output: TextIO, error_output: TextIO
) -> int:
    task_id = await client.submit(argv, env={"PYTHONUNBUFFERED": "1"})

    async def pump(stream: str, out: TextIO) -> None:
        writer = _StreamWriter(out, prefix)
        async for chunk in client.follow_logs(task_id, stream=stream):
            writer.write(chunk)
        writer.close()

    await asyncio.gather(pump("stdout", output), pump("stderr", error_output))
    record = await client.wait_task(task_id)
    return task_exit_code(record)


def _clients(record: clusters.ClusterRecord, session: Any) -> dict[str, AgentClient]:
    return {_short(m): AgentClient(m.agent_url, record.token, session=session) for m in record.machines}


async def _ready_and_run(
    launched: _Launched, argv: list[str] | None, output: TextIO, error_output: TextIO
) -> tuple[int, dict[str, float]]:
    import aiohttp

    timings: dict[str, float] = {}
    record = launched.record
    async with aiohttp.ClientSession() as session:
        clients = _clients(record, session)
        view = make_progress(sys.stderr)
        mark = time.monotonic()
        try:
            await _wait_ready(clients, launched.provider, record, view, launched.ready_timeout_s)
        finally:
            view.close()
        timings["ready"] = time.monotonic() - mark
        if argv is None:
            return 0, timings
        mark = time.monotonic()
        many = len(clients) > 1
        codes = await asyncio.gather(
            *(_run_on(mid, c, argv, f"[{mid}] " if many else "", output, error_output) for mid, c in clients.items())
        )
        timings["task"] = time.monotonic() - mark
    return max(codes), timings


def cost_of(record: clusters.ClusterRecord, until: float) -> float:
    """USD so far: each machine's price x the time since its launch, at most its lifetime (+ the backstop's
    grace) when the record knows it, since no machine runs longer."""
    limit = record.max_lifetime_s + BACKSTOP_GRACE if record.max_lifetime_s else float("inf")
    return sum(m.price_per_hour * min(limit, max(0.0, until - m.launched_at)) / 3600.0 for m in record.machines)


def price_unknown(record: clusters.ClusterRecord) -> bool:
    """A billed provider's machine whose price could not be had (its price_per_hour is 0)."""
    return record.provider not in FREE_PROVIDERS and any(m.price_per_hour == 0 for m in record.machines)


def _cost_line(record: clusters.ClusterRecord, cost: float) -> str:
    if record.provider in FREE_PROVIDERS:
        return f"cost: free ({record.provider})"
    if record.price_per_hour == 0:
        return "cost: unknown (no price could be read)"
    unknown = " + machines of unknown price" if price_unknown(record) else ""
    return f"cost so far: ${cost:.4f} at ${record.price_per_hour:.4f}/h{unknown}"


def run(
    command: Sequence[str],
    *,
    provider: str = "local",
    n: int = 1,
    vm_type: str = "",
    cpu: int = 0,
    memory: float = 0,
    gpu: bool = False,
    arm: bool = False,
    region: str = "",
    keepalive: str = "20m",
    max_lifetime: str = "12h",
    spot_policy: str = "on-demand",
    source: str | Path | None = None,
    cluster: str | None = None,
    extra_ca_certs: Sequence[str | Path] = (),
    pypi_only: bool = False,
    max_cost: float | str | None = "default",
    max_cost_action: str = "",
    output: TextIO | None = None,
    error_output: TextIO | None = None,
) -> RunResult:
    """Run ``command`` on ``n`` fresh machines in the locked environment of ``source`` (default: this one).

    With ``cluster`` naming a cluster from ``up``, runs on its machines instead of launching new ones. The
    machines stop by themselves after ``keepalive`` of idleness. ``pypi_only`` locks a conda ``source`` from PyPI
    alone (no conda channel), as ``rawvm lock --pypi-only`` does.

    ``max_cost`` (USD) caps a launch's worst case (every machine running until its ``max_lifetime``):
    ``"default"`` takes ``max-cost`` from the project's ``pyproject.toml`` ``[tool.rawvm]``, None means no cap.
    Over the cap the launch is refused, or with ``max_cost_action="shorten"`` the lifetimes are lowered to fit.
    """
    out = output if output is not None else sys.stdout
    err = error_output if error_output is not None else sys.stderr
    argv = check_command(command)
    started = time.monotonic()
    if cluster and clusters.exists(cluster):
        record = clusters.load(cluster)
        # machines that were up already answer at once; a short wait tells a stopped cluster quickly
        launched = _Launched(provider=_provider_of(record), record=record, timings={}, ready_timeout_s=30.0)
    else:
        launched = _launch(
            provider_name=provider,
            n=n,
            vm_type=vm_type,
            cpu=cpu,
            memory=memory,
            gpu=gpu,
            arm=arm,
            region=region,
            keepalive=keepalive,
            max_lifetime=max_lifetime,
            spot_policy=spot_policy,
            source=source,
            cluster=cluster,
            extra_ca_certs=extra_ca_certs,
            pypi_only=pypi_only,
            max_cost=max_cost,
            max_cost_action=max_cost_action,
        )
    record = launched.record
    try:
        code, timings = _run_sync(_ready_and_run(launched, argv, out, err))
    except KeyboardInterrupt:
        _say(f"interrupted; the machines of {record.name} stop after their keepalive, or now: rawvm down {record.name}")
        raise
    except RawvmError as exc:
        raise RawvmError(f"{exc} (cluster {record.name})") from None
    timings = {**launched.timings, **timings, "total": time.monotonic() - started}
    cost = 0.0 if record.provider in FREE_PROVIDERS else cost_of(record, time.time())
    keep = format_duration(record.keepalive_s) if record.keepalive_s else "their keepalive"
    _say(
        f"exit code {code} after {timings['total']:.1f} s; {_cost_line(record, cost)}; "
        f"{record.name} stops by itself after {keep} idle (now: rawvm down {record.name})"
    )
    return RunResult(exit_code=code, machines=record.machines, cost_usd=cost, timings=timings, cluster=record.name)


def up(
    *,
    provider: str = "local",
    n: int = 1,
    vm_type: str = "",
    cpu: int = 0,
    memory: float = 0,
    gpu: bool = False,
    arm: bool = False,
    region: str = "",
    keepalive: str = "20m",
    max_lifetime: str = "12h",
    spot_policy: str = "on-demand",
    source: str | Path | None = None,
    cluster: str | None = None,
    extra_ca_certs: Sequence[str | Path] = (),
    pypi_only: bool = False,
    max_cost: float | str | None = "default",
    max_cost_action: str = "",
) -> clusters.ClusterRecord:
    """Launch machines and wait until every one is ready; returns the cluster's record. ``max_cost`` and
    ``max_cost_action`` as in ``run``."""
    launched = _launch(
        provider_name=provider,
        n=n,
        vm_type=vm_type,
        cpu=cpu,
        memory=memory,
        gpu=gpu,
        arm=arm,
        region=region,
        keepalive=keepalive,
        max_lifetime=max_lifetime,
        spot_policy=spot_policy,
        source=source,
        cluster=cluster,
        extra_ca_certs=extra_ca_certs,
        pypi_only=pypi_only,
        max_cost=max_cost,
        max_cost_action=max_cost_action,
    )
    _run_sync(_ready_and_run(launched, None, sys.stdout, sys.stderr))
    return launched.record


@dataclass
class ClusterView:
    name: str
    provider: str
    created: float
    machines: list[dict[str, str]]
    price_per_hour: float  # USD/hour of every machine of the record (0 when free or unknown)
    cost_so_far: float = 0.0  # USD since launch, each machine at most its lifetime
    price_unknown: bool = False  # some machine of a billed provider has no known price

    @property
    def running(self) -> int:
        return sum(1 for m in self.machines if m["state"] not in {"terminated", "stopped", "gone"})


def ls() -> list[ClusterView]:
    """Every recorded cluster with each machine's state as its provider sees it. Clusters whose machines are
    all gone (they stopped by themselves) are forgotten."""
    views = []
    providers: dict[str, Provider] = {}
    for record in clusters.all_records():
        key = json.dumps([record.provider, record.provider_options], sort_keys=True)
        provider = providers[key] if key in providers else providers.setdefault(key, _provider_of(record))
        try:
            known = {m.id: m.state for m in provider.list(record.name)}
        except RawvmError:
            known = None
        machines = [
            {
                "id": m.id,
                "state": (known.get(m.id, "gone") if known is not None else "unknown"),
                "agent_url": m.agent_url,
                "instance_type": m.instance_type,
                "price_per_hour": f"{m.price_per_hour:.6f}" if m.price_per_hour else "unknown",
            }
            for m in record.machines
        ]
        view = ClusterView(
            record.name,
            record.provider,
            record.created,
            machines,
            record.price_per_hour,
            cost_so_far=cost_of(record, time.time()),
            price_unknown=price_unknown(record),
        )
        if known is not None and view.running == 0 and time.time() - record.created > 60:
            # Its machines stopped by themselves; release what was made for the cluster (aws: security group,
            # launch template; qemu: state files) before forgetting it, or nothing would ever clean those up.
            try:
                provider.down(record.name)
            except RawvmError as exc:
                _say(f"{record.name}: its machines are gone but cleaning up failed ({exc}); try 'rawvm down'")
                views.append(view)
                continue
            clusters.remove(record.name)
            continue
        views.append(view)
    return views


def ls_json(views: Sequence[ClusterView]) -> str:
    return json.dumps([{**dataclasses.asdict(v), "running": v.running} for v in views], indent=2, sort_keys=True)


async def _machine_logs(
    mid: str, client: AgentClient, prefix: str, follow: bool, output: TextIO, error_output: TextIO
) -> bool:
    """Print one machine's latest task output; False when its agent does not answer (stopped?)."""
    try:
        tasks = await client.tasks()
    except AgentError:
        return False
    if not tasks:
        _say(f"{mid}: no task yet")
        return True
    last = str(max(tasks, key=lambda t: float(t.get("started_at") or 0))["id"])

    async def pump(stream: str, out: TextIO) -> None:
        writer = _StreamWriter(out, prefix)
        if follow:
            async for chunk in client.follow_logs(last, stream=stream):
                writer.write(chunk)
        else:
            offset = 0
            while True:
                data, offset = await client.logs(last, stream=stream, offset=offset)
                if not data:
                    break
                writer.write(data)
        writer.close()

    await asyncio.gather(pump("stdout", output), pump("stderr", error_output))
    return True


async def _logs(record: clusters.ClusterRecord, follow: bool, output: TextIO, error_output: TextIO) -> int:
    import aiohttp

    many = len(record.machines) > 1
    async with aiohttp.ClientSession() as session:
        clients = _clients(record, session)
        answered = await asyncio.gather(
            *(
                _machine_logs(mid, client, f"[{mid}] " if many else "", follow, output, error_output)
                for mid, client in clients.items()
            )
        )
    stopped = [mid for mid, ok in zip(clients, answered, strict=True) if not ok]
    if stopped and _print_stopped(record, stopped, many, output, error_output):
        return 0
    return 0 if any(answered) else 1


def _print_stopped(
    record: clusters.ClusterRecord, stopped: Sequence[str], many: bool, output: TextIO, error_output: TextIO
) -> bool:
    """The flushed output of the machines whose agents did not answer; False when none was shown.

    A flush is named after its agent's label: the machine id on local and qemu, but the host name on EC2 (every
    machine there shares one agent.toml), which the record does not know. So flushes that name no recorded
    machine are shown too, under their own name: they come from machines that have stopped."""
    fetch_flushes(record.name, _provider_of(record))
    flushed = flushed_machines(record.name)
    known = {_short(m) for m in record.machines}
    unnamed = [mid for mid in flushed if mid not in known]
    many = many or len(unnamed) > 1
    shown = False
    for mid in [m for m in stopped if m in flushed] + unnamed:
        shown = print_flushed_logs(record.name, mid, f"[{mid}] " if many else "", output, error_output) or shown
    if not unnamed:
        for mid in stopped:
            if mid not in flushed:
                _say(f"{mid}: its agent does not answer (stopped?) and it has flushed no logs to the sink yet")
    return shown


def sink_dir(cluster: str) -> Path:
    """Where this host keeps a cluster's flushes: the local provider's sink, and what ``fetch_sink`` brings."""
    return clusters.state_dir() / "sinks" / cluster


_SINK_PROVIDER = "provider.json"


def remember_sink_provider(cluster: str, provider: str, options: dict[str, str]) -> None:
    """Note the cluster's provider (and e.g. its region) beside its flushes: once ``rawvm ls`` has forgotten the
    cluster, ``rawvm logs`` still knows where the flushes are."""
    directory = sink_dir(cluster)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / _SINK_PROVIDER).write_text(json.dumps({"provider": provider, "options": options}, sort_keys=True))


def _remembered_provider(cluster: str) -> Provider | None:
    """The provider noted at launch; None when there is no note (a cluster launched before notes were kept:
    only its local flushes can be read)."""
    try:
        raw = json.loads((sink_dir(cluster) / _SINK_PROVIDER).read_text())
        name, options = str(raw["provider"]), {str(k): str(v) for k, v in dict(raw.get("options", {})).items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None
    return get_provider(name, **options)


def fetch_flushes(cluster: str, provider: Provider | None) -> int:
    """Bring the cluster's flushes into ``sink_dir`` with the provider's ``fetch_sink`` hook, when it has one
    (local machines flush there directly). A failure is said, not raised: what was fetched before still shows."""
    fetch: Callable[[str, Path], int] | None = getattr(provider, "fetch_sink", None)
    if fetch is None:
        return 0
    try:
        return fetch(cluster, sink_dir(cluster))
    except RawvmError as exc:
        _say(f"{cluster}: cannot fetch the logs its machines flushed: {exc}")
        return 0


def _flush_owner(cluster: str, name: str) -> str:
    """The machine of the flush directory ``<cluster>-<machine>-<UTC time>``. A qemu agent's machine id starts
    with the cluster already (``<cluster>-<cluster>-<id>-<UTC>``): that repeat is dropped to give the short id."""
    return name[len(cluster) + 1 :].rsplit("-", 1)[0].removeprefix(f"{cluster}-")


def _flushes(cluster: str) -> dict[str, list[Path]]:
    """Each machine's flush directories in this host's sink directory, oldest first."""
    found: dict[str, list[Path]] = {}
    for path in sorted(sink_dir(cluster).glob(f"{cluster}-*-*")):
        if path.is_dir():
            found.setdefault(_flush_owner(cluster, path.name), []).append(path)
    return found


def flushed_machines(cluster: str) -> list[str]:
    """Machines of ``cluster`` whose flushed logs are in this host's sink directory (local machines flush there
    themselves; ``fetch_flushes`` brings those of the other providers)."""
    return sorted(_flushes(cluster))


def print_flushed_logs(cluster: str, mid: str, prefix: str, output: TextIO, error_output: TextIO) -> bool:
    """The latest task's output from the last flush ``mid`` made to the sink; False when there is none."""
    flushes = _flushes(cluster).get(mid, [])
    if not flushes:
        return False
    tasks = []
    for record_path in flushes[-1].glob("tasks/*/task.json"):
        with contextlib.suppress(OSError, ValueError):
            tasks.append((float(json.loads(record_path.read_text()).get("started_at") or 0), record_path.parent))
    if not tasks:
        return False
    task_dir = max(tasks)[1]
    for stream, out in (("stdout", output), ("stderr", error_output)):
        writer = _StreamWriter(out, prefix)
        with contextlib.suppress(FileNotFoundError):
            writer.write((task_dir / stream).read_bytes())
        writer.close()
    _say(f"{mid} has stopped: this is the output it flushed to {flushes[-1]}")
    return True


def logs(cluster: str, *, follow: bool = False, output: TextIO | None = None) -> int:
    """Print the output of the latest task on each machine of ``cluster``; ``follow`` until it ends.

    Machines that have stopped, and clusters already forgotten, answer from the logs they flushed to their sink
    (fetched first from the provider's sink, for qemu and aws)."""
    out = output or sys.stdout
    if not clusters.exists(cluster):
        name = clusters.check_name(cluster)
        fetch_flushes(name, _remembered_provider(name))
        if mids := flushed_machines(name):
            many = len(mids) > 1
            shown = [print_flushed_logs(name, mid, f"[{mid}] " if many else "", out, sys.stderr) for mid in mids]
            return 0 if any(shown) else 1
    record = clusters.load(cluster)
    return _run_sync(_logs(record, follow, out, sys.stderr))


def down(cluster: str) -> int:
    """Stop every machine of ``cluster`` now and forget it; returns how many were running."""
    record = clusters.load(cluster)
    provider = _provider_of(record)
    running = sum(1 for m in provider.list(record.name) if m.state not in {"terminated", "stopped"})
    with contextlib.suppress(RawvmError):
        _run_sync(_shutdown_all(record))  # ask first: a stopping agent flushes its logs to the sink
    stopped = provider.down(record.name)
    clusters.remove(record.name)
    return max(running, stopped)


_FLUSH_WAIT_S = 60.0


async def _shutdown_all(record: clusters.ClusterRecord, flush_wait: float = _FLUSH_WAIT_S) -> None:
    """Ask every agent to stop, then give each up to ``flush_wait`` to flush its logs and telemetry to the sink
    (phase ``off``, or no answer any more) before the provider ends the machines: ending them at once lost it."""
    import aiohttp

    async with aiohttp.ClientSession() as session:
        clients = [AgentClient(m.agent_url, record.token, session=session, timeout=5) for m in record.machines]
        asked = []
        for client in clients:
            with contextlib.suppress(AgentError):
                await client.shutdown()
                asked.append(client)

        async def flushed(client: AgentClient) -> None:
            deadline = time.monotonic() + flush_wait
            while time.monotonic() < deadline:
                try:
                    if (await client.status()).get("phase") == "off":
                        return
                except AgentError:
                    return  # gone: it flushed and exited
                await asyncio.sleep(_POLL_S)

        await asyncio.gather(*(flushed(c) for c in asked))
