"""One launch path for every door (``run``, ``up``, ``batch``, ``@function``, ``dask_cluster``): check the price,
lock the environment into a bundle, stage it, start the machines, and keep a record of the cluster.

What a feature adds to a plain launch (a batch spec staged beside the bundle, a Dask cluster's TLS files and ports)
comes as one ``LaunchExtras``; everything the user asked for comes as one ``LaunchOptions``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import secrets
import shutil
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from rawvm_agent.config import AgentConfig, BundleConfig, BundleFile, IdleConfig, InstallConfig, SpotConfig
from rawvm_resolver.target import DEFAULT_CUDA, Target, parse_platform

from rawvm import clusters, cost_guard, sinks
from rawvm.errors import RawvmError, UsageError
from rawvm.files import sha256_file
from rawvm.options import BACKSTOP_GRACE, Environment, LaunchOptions
from rawvm.providers import get_provider
from rawvm.providers.base import Machine, MachineSpec, Provider, next_machine_index
from rawvm.session import Launched, say


@dataclass(frozen=True)
class LaunchExtras:
    """What a feature adds to a plain launch; every field's default adds nothing."""

    extra_code: tuple[tuple[str, Path], ...] = ()
    """``(bundle name, tar.gz)`` archives added to the bundle as code (listed in its manifest with their sha256,
    unpacked into the work dir), e.g. a Dask cluster's TLS files."""

    extra_files: tuple[tuple[str, Path], ...] = ()
    """Files staged beside the bundle (e.g. a batch spec); ``amend_agent`` says what they are for."""

    amend_agent: Callable[[AgentConfig, dict[str, str]], AgentConfig] | None = None
    """``amend_agent(agent config, staged URLs)``: adds what ``extra_files`` are for to every machine's config."""

    check_bundle: Callable[[Path], None] | None = None
    """May refuse the locked bundle (UsageError) before anything is staged or launched."""

    open_ports: tuple[int, ...] = ()
    """TCP ports besides the agent's that the caller reaches on every machine (see ``MachineSpec``)."""

    peer_ports: tuple[int, int] | None = None
    """A TCP port range the cluster's machines reach on each other (see ``MachineSpec``)."""

    client_timeout: float | None = None
    """How long a keepalive ping keeps a machine busy (None: the agent's default)."""

    machines_before: tuple[str, ...] = ()
    """Short names of machines an earlier launch of the same cluster had (a batch's earlier rounds): the new
    machines are numbered after them and after every machine that flushed to the sink (``first_index``)."""


def target_for(provider: Provider, spec: MachineSpec) -> Target:
    """The resolver target: the provider's platform, and its glibc and Python where it knows them."""
    return Target(
        arch=parse_platform(provider.target_platform(spec)),
        python=provider.target_python(),  # "": the resolver takes the source's Python
        glibc=provider.target_glibc(),
        accelerator="cuda" if spec.request.gpu else "cpu",
        cuda=DEFAULT_CUDA if spec.request.gpu else "",
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


def locked_bundle(env: Environment, target: Target, dest: Path) -> tuple[Path, str]:
    """Lock ``env.source`` into ``dest``: the bundle directory and its manifest's sha256. With ``env.bundle_cache`` (a
    directory named after everything the bundle depends on, as ``@rawvm.function`` keeps them), a bundle already
    there is used as it is, and a fresh one is kept there for the next launch."""
    bundle_cache, extra_requirements = env.bundle_cache, env.extra_requirements
    if bundle_cache is not None and (bundle_cache / "rawvm-env.toml").is_file():
        say(f"lock: the environment is unchanged, using its bundle from {bundle_cache}")
        return bundle_cache, sha256_file(bundle_cache / "rawvm-env.toml")
    from rawvm_resolver import lock

    locked = lock(
        env.source,
        target,
        dest,
        progress=say,
        extra_requirements=extra_requirements,
        project_dir=env.project_dir,
        pypi_only=env.pypi_only,
    )
    for warning in locked.warnings:
        say(f"warning: {warning}")
    asked = {canonicalize_name(Requirement(line).name) for line, _ in extra_requirements}
    for row in locked.rows:
        if row.name in asked and row.action == "added":
            say(f"lock: added {row.name} {row.target} ({row.reason})")
    if summary := lock_summary(locked.rows):
        say(f"lock: {summary} (details: rawvm lock --explain)")
    if bundle_cache is not None:
        partial = bundle_cache.with_name(f".{bundle_cache.name}.partial")
        shutil.rmtree(partial, ignore_errors=True)
        shutil.copytree(locked.bundle_dir, partial)
        try:
            partial.rename(bundle_cache)  # whole or not at all: a cut copy never passes for a bundle
        except OSError:
            shutil.rmtree(partial, ignore_errors=True)  # another process kept the same bundle first
    return locked.bundle_dir, locked.manifest_sha256


def lock_ahead(options: LaunchOptions, dest: Path) -> Path:
    """Lock the environment for the machines ``options`` asks for into ``dest``, before anything launches. A caller
    that launches such machines again and again (a Dask cluster's scale-ups) passes ``dest`` as ``bundle_cache`` and
    each launch uses the bundle as it is instead of locking anew."""
    request = options.request
    where = {"region": request.region} if request.region and request.provider == "aws" else {}
    provider = get_provider(request.provider, **where)
    target = target_for(provider, MachineSpec(cluster="", request=request, agent=AgentConfig(), agent_wheel=Path()))
    scratch = Path(tempfile.mkdtemp(prefix="rawvm-bundle-"))
    try:  # the lock is written into scratch, then copied to dest whole (``locked_bundle``)
        locked_bundle(dataclasses.replace(options.environment, bundle_cache=dest), target, scratch / "bundle")
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    if not (dest / "rawvm-env.toml").is_file():
        raise RawvmError(f"the locked bundle could not be kept at {dest}")
    return dest


def launch(options: LaunchOptions, extras: LaunchExtras = LaunchExtras()) -> Launched:
    """Check the price, lock, stage, launch; a launch that fails releases what it left (``launch_or_release``)."""
    request, env = options.request, options.environment
    cap, cap_action = cost_guard.resolve(options.cost.max_cost, options.cost.action, env.project)
    name = clusters.check_name(options.cluster) if options.cluster else clusters.new_name()
    if clusters.exists(name):
        raise UsageError(f"a cluster named {name!r} exists: pick another name or 'rawvm down {name}' first")
    where = {"region": request.region} if request.region and request.provider == "aws" else {}  # to find them again
    provider = get_provider(request.provider, **where)
    timings: dict[str, float] = {}
    started = time.monotonic()

    from rawvm.agent.wheel import build_agent_wheel

    token = secrets.token_urlsafe(32)
    idle = IdleConfig(keepalive=options.lifetime.keepalive_s, max_lifetime=options.lifetime.max_lifetime_s)
    if extras.client_timeout is not None:
        idle = dataclasses.replace(idle, client_timeout=extras.client_timeout)
    agent = AgentConfig(
        cluster=name,
        token_sha256=hashlib.sha256(token.encode()).hexdigest(),  # the token itself stays in the 0600 record
        idle=idle,
        install=InstallConfig(
            native_tls=bool(request.extra_ca_certs),  # extra CAs go into the trust store
            compile_bytecode=options.environment.compile_bytecode,
        ),
        spot=SpotConfig(enabled=request.spot_policy != "on-demand"),
    )
    spec = MachineSpec(
        cluster=name,
        request=request,
        agent=agent,
        agent_wheel=Path(),  # built below, once the options have passed the provider's checks
        open_ports=extras.open_ports,
        peer_ports=extras.peer_ports,
        first_index=next_machine_index([*sinks.flushes(name), *extras.machines_before]),
    )
    target = target_for(provider, spec)
    # The price before anything slow or billed: a refused launch has locked, staged and started nothing.
    lifetime_s = cost_guard.guard(
        lambda: provider.estimate(spec),
        lifetime_s=options.lifetime.max_lifetime_s,
        grace_s=BACKSTOP_GRACE,
        max_cost=cap,
        action=cap_action,
        say=say,
    )
    agent = dataclasses.replace(agent, idle=dataclasses.replace(agent.idle, max_lifetime=lifetime_s))
    spec = dataclasses.replace(spec, agent=agent, agent_wheel=build_agent_wheel())
    bundle_root = Path(tempfile.mkdtemp(prefix="rawvm-bundle-"))
    try:
        bundle_dir, manifest_sha256 = locked_bundle(env, target, bundle_root / "bundle")
        timings["lock"] = time.monotonic() - started
        if extras.check_bundle is not None:
            extras.check_bundle(bundle_dir)
        if extras.extra_code:
            manifest_sha256 = add_code_files(bundle_dir, extras.extra_code)
        files = bundle_files(bundle_dir)
        record = clusters.ClusterRecord(
            name=name,
            provider=request.provider,
            token=token,
            keepalive_s=options.lifetime.keepalive_s,
            max_lifetime_s=lifetime_s,
            provider_options=where,
            channel_dir=str(clusters.channel_files(name).directory),
            source=str(Path(env.source).resolve()) if env.source is not None else "",
            pypi_only=env.pypi_only,
            project=str((env.project_dir or Path.cwd()).resolve()),  # what code.tar.gz is made of
        )
        # The cluster's CA lives as long as its machines can (the backstop powers them off by then); its key is
        # never written, the agents' certificate goes with the spec, the laptop's beside the record.
        spec = dataclasses.replace(spec, channel=clusters.new_channel(name, lifetime_s + BACKSTOP_GRACE))
        clusters.save(record)  # before staging, so 'rawvm down NAME' finds what a failed launch left
        sinks.remember_sink_provider(name, request.provider, where)  # 'rawvm logs' after the record goes

        def stage_and_launch() -> list[Machine]:
            nonlocal spec
            mark = time.monotonic()
            # Valid as long as a machine may reinstall after a reboot: until the backstop powers it off.
            urls = provider.stage(name, [*files, *extras.extra_files], valid_s=lifetime_s + BACKSTOP_GRACE)
            staged = dataclasses.replace(
                agent, bundle=bundle_config(files, urls, manifest_sha256), sink=provider.sink_url(name)
            )
            if extras.amend_agent is not None:
                staged = extras.amend_agent(staged, urls)
            spec = dataclasses.replace(spec, agent=staged)
            timings["stage"] = time.monotonic() - mark
            mark = time.monotonic()
            say(f"launching {request.plural} as cluster {name}")
            machines = provider.launch(spec)
            timings["launch"] = time.monotonic() - mark
            return machines

        record.machines = launch_or_release(provider, name, stage_and_launch)
    finally:
        shutil.rmtree(bundle_root, ignore_errors=True)
    clusters.save(record)
    return Launched(provider=provider, record=record, timings=timings)


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
