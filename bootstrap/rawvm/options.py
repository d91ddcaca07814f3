"""What a launch is asked for, as a few small frozen objects validated once.

The same machine options reach rawvm from five doors (``rawvm run``/``up``/``batch run``/``dask up`` flags, and
``rawvm.run``/``up``/``batch``/``dask_cluster``/``function``). Each door builds these objects in one call
(``rawvm.api.launch_options``, which the CLI's flags feed too); everything below the front door
takes the objects, never the loose values. A bad value fails in ``__post_init__`` with one line naming the flag.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rawvm_agent.durations import DurationError, format_duration, parse_duration

from rawvm.errors import UsageError

PROVIDERS = ("local", "qemu", "aws")  # providers.get_provider builds each
SPOT_POLICIES = ("on-demand", "spot", "spot_with_fallback")
DEFAULT_KEEPALIVE = "20m"
DEFAULT_MAX_LIFETIME = "12h"
BACKSTOP_GRACE = 600  # seconds past max_lifetime before the backstop powers off regardless of the agent
MAX_COST_NOT_GIVEN = "default"  # the project's [tool.rawvm] max-cost applies
CLI_FLAGS = ("--keepalive", "--max-lifetime")  # how errors name the lifetime options on the command line


def parse_duration_flag(flag: str, value: str | float) -> float:
    """Seconds of a duration flag (``90s``, ``20m``, ``1h30m``; a number is seconds), which must be positive."""
    if isinstance(value, int | float):
        seconds = float(value)
    else:
        try:
            seconds = parse_duration(value)
        except DurationError:
            raise UsageError(f"{flag} {value!r} is not a duration: use e.g. 90s, 20m, 2h or 1h30m") from None
    if seconds <= 0:
        raise UsageError(f"{flag} must be longer than 0s")
    return seconds


def check_command(command: Sequence[str]) -> list[str]:
    """The argv to run: ``command`` without a leading ``--``; a usage error when nothing is left."""
    argv = list(command)
    if argv[:1] == ["--"]:
        argv = argv[1:]
    if not argv:
        raise UsageError("no command to run: put it after '--', e.g. rawvm run -- python script.py")
    return argv


def check_ca_certs(paths: Sequence[str | Path]) -> tuple[Path, ...]:
    """Absolute paths of readable PEM certificate files; a usage error naming the first one that is not."""
    out = []
    for raw in paths:
        path = Path(raw).expanduser()
        if not path.is_file() or b"BEGIN CERTIFICATE" not in path.read_bytes():
            raise UsageError(f"--extra-ca-cert {raw}: not a readable PEM certificate file")
        out.append(path.resolve())
    return tuple(out)


@dataclass(frozen=True)
class MachineRequest:
    """Which machines to start: where, how many, and of what kind. SkyPilot calls this ``Resources``."""

    provider: str = "local"
    """Where the machines run: ``local`` (processes on this host), ``qemu`` (VMs on this host) or ``aws``."""

    n: int = 1
    """How many machines."""

    vm_type: str = ""
    """An explicit instance type (``m7i.large``); empty: the cheapest that fits ``cpu``/``memory``/``gpu``/``arm``."""

    cpu: int = 0
    """At least this many vCPUs (0: any)."""

    memory: float = 0.0
    """At least this many GiB of memory (0: any)."""

    gpu: bool = False
    """An NVIDIA GPU machine; the environment is locked for CUDA."""

    arm: bool = False
    """An aarch64 machine; the environment is locked for linux-aarch64."""

    region: str = ""
    """The cloud region (aws); empty: the configured default."""

    spot_policy: str = "on-demand"
    """``on-demand``, ``spot``, or ``spot_with_fallback`` (spot first, the shortfall on demand)."""

    extra_ca_certs: tuple[Path, ...] = ()
    """PEM files of CAs the machines must trust (TLS-intercepting proxies); ``api.launch_options`` checks them."""

    efa: bool = False
    """aws: EFA network interfaces (types whose DescribeInstanceTypes says EfaSupported) in a cluster placement
    group, and NCCL/libfabric set up for them in every task."""

    def __post_init__(self) -> None:
        if self.provider not in PROVIDERS:
            raise UsageError(f"unknown provider {self.provider!r}: choose one of {', '.join(PROVIDERS)}")
        if self.n < 1:
            raise UsageError(f"-n {self.n}: the number of machines must be at least 1")
        if self.cpu < 0 or self.memory < 0:
            raise UsageError("--cpu and --memory must not be negative")
        if self.vm_type and (self.cpu or self.memory or self.gpu or self.arm):
            raise UsageError("give either --vm-type or --cpu/--memory/--gpu/--arm, not both")
        if self.efa and self.provider != "aws":
            raise UsageError(f"--efa needs --provider aws: {self.provider} machines have no EFA interfaces")
        if self.spot_policy not in SPOT_POLICIES:
            raise UsageError(f"unknown spot policy {self.spot_policy!r}: choose one of {', '.join(SPOT_POLICIES)}")

    def replace(self, **changes: Any) -> MachineRequest:
        """A copy with some fields changed (checked again)."""
        return dataclasses.replace(self, **changes)

    def of_type(self, vm_type: str, n: int) -> MachineRequest:
        """``n`` machines of ``vm_type`` (the resource hints dropped), or of this request's kind when it is empty."""
        if not vm_type:
            return self.replace(n=n)
        return self.replace(n=n, vm_type=vm_type, cpu=0, memory=0.0, gpu=False, arm=False)

    @property
    def plural(self) -> str:
        """``1 local machine`` / ``3 aws machines``: how progress lines count a launch."""
        return f"{self.n} {self.provider} machine{'s' if self.n > 1 else ''}"


@dataclass(frozen=True)
class Lifetime:
    """How long the machines live: they stop by themselves after ``keepalive_s`` idle, and after
    ``max_lifetime_s`` in any case (the agent, then a systemd backstop, powers the machine off)."""

    keepalive_s: float = 20 * 60.0
    """Seconds with no task, no client and a quiet CPU/GPU before a machine stops."""

    max_lifetime_s: float = 12 * 3600.0
    """Seconds after boot when a machine stops even if busy (a cost guard may shorten it)."""

    def __post_init__(self) -> None:
        if self.keepalive_s <= 0:
            raise UsageError("--keepalive must be longer than 0s")
        if self.max_lifetime_s <= 0:
            raise UsageError("--max-lifetime must be longer than 0s")

    @classmethod
    def parse(cls, keepalive: str | float, max_lifetime: str | float, flags: tuple[str, str] = CLI_FLAGS) -> Lifetime:
        """From durations as users write them (``20m``, ``12h``); an error names ``flags[0]`` or ``flags[1]``."""
        return cls(parse_duration_flag(flags[0], keepalive), parse_duration_flag(flags[1], max_lifetime))

    @property
    def keepalive(self) -> str:
        """The keepalive as users write it, for messages (``20m``)."""
        return format_duration(self.keepalive_s)


@dataclass(frozen=True)
class Environment:
    """What the machines run in: the environment to lock and what the lock adds to it."""

    source: str | Path | None = None
    """A venv, interpreter, requirements/lock file or project directory; None: the running environment."""

    pypi_only: bool = False
    """Lock a conda environment from PyPI alone."""

    compile_bytecode: bool = False
    """Compile the environment's ``.pyc`` files as it is installed (uv ``--compile-bytecode``): the first imports
    of each task are faster, the install slower (2.5x for a small environment under TCG: bench/startup.py
    --uv-settings). Off by default, as uv's is: a one-shot machine seldom imports a module twice."""

    extra_requirements: tuple[tuple[str, str], ...] = ()
    """``(PEP 508 line, why)`` pairs the lock adds when the environment lacks them (e.g. cloudpickle)."""

    bundle_cache: Path | None = None
    """A directory named after everything the bundle depends on: a bundle already there is used as it is, and a
    fresh one is kept there (``@rawvm.function`` reuses locks this way)."""

    project_dir: Path | None = None
    """The project whose files travel as code; None: the source directory, else the current one."""

    @property
    def project(self) -> Path:
        """The directory whose ``pyproject.toml`` holds the ``[tool.rawvm]`` defaults."""
        if self.project_dir is not None:
            return self.project_dir
        if self.source is not None and Path(self.source).is_dir():
            return Path(self.source)
        return Path.cwd()


def _env_pairs(flag: str, given: Mapping[str, str] | Sequence[str] | None) -> tuple[tuple[str, str], ...]:
    """``KEY=VALUE`` items, bare ``KEY`` items (the value taken from this process's environment) or a mapping, as
    sorted ``(KEY, VALUE)`` pairs; a usage error names the flag and the first bad item (never its value)."""
    if not given:
        return ()
    items = list(given.items()) if isinstance(given, Mapping) else [_split_env(flag, raw) for raw in given]
    out: dict[str, str] = {}
    for name, value in items:
        if not isinstance(name, str) or not isinstance(value, str):
            raise UsageError(f"{flag}: names and values must be strings")
        if not name or "=" in name or "\0" in name or "\0" in value:
            raise UsageError(f"{flag} {name[:64]!r}: a name must be non-empty, without '=' or NUL; a value without NUL")
        out[name] = value
    return tuple(sorted(out.items()))


def _split_env(flag: str, raw: str) -> tuple[str, str]:
    if "=" in raw:
        name, _, value = raw.partition("=")
        return name, value
    if raw not in os.environ:
        raise UsageError(f"{flag} {raw}: not set here; give {flag} {raw}=VALUE or export {raw} first")
    return raw, os.environ[raw]


@dataclass(frozen=True)
class TaskEnvironment:
    """Environment variables the machines' tasks get. Secrets travel only over the mutual-TLS agent API with the
    tasks: never in user-data, cluster or batch records, or a command line; their values are masked in every
    log and output stream on the machines, and ``repr`` shows their names only."""

    env: tuple[tuple[str, str], ...] = ()
    """``(NAME, value)`` pairs every task sees."""

    secrets: tuple[tuple[str, str], ...] = dataclasses.field(default=(), repr=False)
    """``(NAME, value)`` pairs every task sees, masked in logs and output."""

    @classmethod
    def parse(
        cls,
        env: Mapping[str, str] | Sequence[str] | None = None,
        secrets: Mapping[str, str] | Sequence[str] | None = None,
    ) -> TaskEnvironment:
        """From ``--env``/``--secret`` items (``KEY=VALUE``, or ``KEY`` taken from this environment) or mappings."""
        return cls(_env_pairs("--env", env), _env_pairs("--secret", secrets))

    @property
    def secret_names(self) -> list[str]:
        return [name for name, _ in self.secrets]

    def all_values(self) -> dict[str, str]:
        """Every variable, secrets last (a secret wins over a plain variable of the same name)."""
        return {**dict(self.env), **dict(self.secrets)}

    def __bool__(self) -> bool:
        return bool(self.env or self.secrets)

    def __repr__(self) -> str:
        return f"TaskEnvironment(env={[n for n, _ in self.env]}, secrets={self.secret_names})"

    def to_json(self) -> dict[str, Any]:
        """What a record may keep: plain variables, and secrets by name only (``from_json`` finds their values in
        this process's environment again, or leaves them out)."""
        return {"env": [list(p) for p in self.env], "secret_names": self.secret_names}

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> TaskEnvironment:
        names = [str(n) for n in raw.get("secret_names", [])]
        return cls(
            env=tuple((str(k), str(v)) for k, v in raw.get("env", [])),
            secrets=tuple((n, os.environ[n]) for n in names if n in os.environ),
        )


@dataclass(frozen=True)
class CostCap:
    """The cap on a launch's worst case (every machine until its max lifetime), checked before anything starts."""

    max_cost: float | str | None = MAX_COST_NOT_GIVEN
    """USD, ``"none"``/None for no cap, or ``"default"``: ``max-cost`` in the project's ``[tool.rawvm]``."""

    action: str = ""
    """Over the cap: ``refuse`` the launch, or ``shorten`` each machine's lifetime to fit ("": the project's)."""


@dataclass(frozen=True)
class LaunchOptions:
    """Everything the shared machine flags say, in one object: the CLI and the Python front door build it once."""

    request: MachineRequest = dataclasses.field(default_factory=MachineRequest)
    lifetime: Lifetime = dataclasses.field(default_factory=Lifetime)
    environment: Environment = dataclasses.field(default_factory=Environment)
    cost: CostCap = dataclasses.field(default_factory=CostCap)
    task_env: TaskEnvironment = dataclasses.field(default_factory=TaskEnvironment)
    """Variables (and secrets) every task on the machines sees."""
    cluster: str | None = None
    """The cluster's name (lowercase letters, digits, dashes); None: a fresh ``rawvm-xxxxxx``."""

    def replace(self, **changes: Any) -> LaunchOptions:
        return dataclasses.replace(self, **changes)

    def to_json(self) -> dict[str, Any]:
        """A JSON form (kept in a batch's record so a retry launches the same way)."""
        raw = dataclasses.asdict(self)
        raw["task_env"] = self.task_env.to_json()  # never a secret's value
        request = raw["request"]
        request["extra_ca_certs"] = [str(p) for p in self.request.extra_ca_certs]
        env = raw["environment"]
        env["source"] = str(self.environment.source) if self.environment.source is not None else None
        env["extra_requirements"] = [list(r) for r in self.environment.extra_requirements]
        for key in ("bundle_cache", "project_dir"):
            env[key] = str(env[key]) if env[key] is not None else None
        return raw

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> LaunchOptions:
        request = dict(raw["request"])
        request["extra_ca_certs"] = tuple(Path(p) for p in request.get("extra_ca_certs", ()))
        env = dict(raw["environment"])
        env["extra_requirements"] = tuple(tuple(r) for r in env.get("extra_requirements", ()))
        for key in ("bundle_cache", "project_dir"):
            env[key] = Path(env[key]) if env.get(key) else None
        return cls(
            request=MachineRequest(**request),
            lifetime=Lifetime(**raw["lifetime"]),
            environment=Environment(**env),
            cost=CostCap(**raw["cost"]),
            task_env=TaskEnvironment.from_json(raw.get("task_env") or {}),
            cluster=raw.get("cluster"),
        )
