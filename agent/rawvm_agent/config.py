"""The agent's configuration: ``agent.toml``. The bootstrap writes it, the agent reads it.

This is one of rawvm's contracts (docs/architecture.md): keep field names stable, add with defaults.
"""

from __future__ import annotations

import hashlib
import re
import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from rawvm_agent import DEFAULT_PORT
from rawvm_agent.durations import parse_duration


class ConfigError(ValueError):
    """agent.toml is missing, malformed, or holds a bad value; the message names the key."""


@dataclass(frozen=True)
class BundleFile:
    """One file of the environment bundle: where to fetch it and the sha256 it must have."""

    path: str  # relative path inside the bundle, e.g. "pylock.toml" or "wheels/x-1.0-py3-none-any.whl"
    url: str  # http(s)://, file:// or a plain absolute path
    sha256: str


@dataclass(frozen=True)
class BundleConfig:
    """The environment bundle to install. Empty ``files`` means: no environment, the agent's own Python."""

    files: tuple[BundleFile, ...] = ()
    # sha256 of rawvm-env.toml, which itself lists every file's sha256 (the manifest is the root of trust).
    manifest_sha256: str = ""


@dataclass(frozen=True)
class InstallConfig:
    index_url: str = ""  # empty: uv's default (PyPI)
    extra_index_urls: tuple[str, ...] = ()
    ca_certs: tuple[str, ...] = ()  # extra PEM files uv must trust (TLS-intercepting proxies)
    native_tls: bool = False  # uv --native-tls: use the system trust store
    # uv --compile-bytecode: off, as uv's default, unless the launch asked (bench/startup.py --uv-settings measured
    # uv's other one-shot settings in the guest: its defaults were the fastest, bytecode 2.5x slower).
    compile_bytecode: bool = False
    uv: str = "uv"  # the uv executable
    # Seconds to wait for ``uv`` to appear before its first run: the user-data fetches uv while the agent starts
    # (the agent needs it only to install the bundle). 0: it must be there already.
    uv_wait: float = 0.0


@dataclass(frozen=True)
class IdleConfig:
    keepalive: float = 20 * 60.0  # seconds of continuous idleness before the VM stops
    client_timeout: float = 120.0  # a keepalive ping keeps the VM busy this long
    window: float = 30.0  # sliding window over which CPU/GPU must stay below thresholds
    cpu_threshold: float = 10.0  # percent of all cores
    gpu_threshold: float = 5.0  # percent utilization, every GPU
    max_lifetime: float = 12 * 3600.0  # hard stop, even when busy
    poweroff_command: tuple[str, ...] = ("systemctl", "poweroff")  # empty: the agent process just exits


@dataclass(frozen=True)
class TelemetryConfig:
    interval: float = 1.0
    ring_seconds: float = 3600.0
    nvml_library: str = ""  # empty: NVML's default search
    # "machine": CPU and memory of the whole machine. "process-tree": of the agent's own process tree only, for
    # machines that share a host (the local provider), which would otherwise all report the host's figures.
    scope: str = "machine"


@dataclass(frozen=True)
class SpotConfig:
    enabled: bool = False
    imds_url: str = "http://169.254.169.254"
    poll: float = 5.0


@dataclass(frozen=True)
class TaskConfig:
    log_cap_bytes: int = 256 * 1024 * 1024  # per stream; beyond it output is dropped and counted
    chatty_bytes_per_s: int = 1024 * 1024  # warn above this sustained write rate


@dataclass(frozen=True)
class LimitsConfig:
    """Caps on what the API's callers can make one agent hold; beyond each the request is a one-line JSON 429.

    They bound a runaway (or hostile) token holder's memory and file use, not real work, so the defaults are
    generous. Batch tasks (the machine's own spec) and call workers are not API tasks and are not counted.
    """

    tasks_kept: int = 10_000
    """Tasks the agent keeps (running and ended, each with its logs) before ``POST /v1/tasks`` is refused."""
    tasks_running: int = 1_000
    """Tasks running at once; ``POST /v1/tasks`` is refused until one ends."""
    log_follows: int = 64
    """Concurrent ``follow=1`` log streams (each holds a connection and a poll loop) across all tasks."""
    call_result_bytes: int = 1 << 30
    """Finished ``@rawvm.function`` result bytes held for one client; its ``POST /v1/calls`` is refused until it
    fetches them (``GET /v1/calls/results``), so results cannot pile up in memory unread."""


@dataclass(frozen=True)
class BatchConfig:
    """A batch array this machine runs by itself (rawvm_agent.batch). Empty ``spec_url``: no batch."""

    spec_url: str = ""  # the staged batch spec (JSON: command, task ids and values, retries), fetched like the bundle
    spec_sha256: str = ""
    index: int = -1  # this machine's share; -1: from machine_id ``...m<k>``, or given later over the API


@dataclass(frozen=True)
class AgentConfig:
    cluster: str = "default"
    machine_id: str = ""
    bind: str = "127.0.0.1"
    port: int = DEFAULT_PORT
    # The bearer token's sha256 (hex): what rawvm writes, so agent.toml, the user-data and a launch template hold
    # nothing that opens the API. ``token`` / ``token_file`` (the token itself) remain for hand-run agents.
    token_sha256: str = ""
    token: str = field(default="", repr=False)  # bearer token; never logged
    token_file: str = ""  # alternative to token: a root-only file holding it
    # The API serves only mutual TLS: the agent's certificate and key (0600), and the cluster CA whose
    # certificates clients must present. ``serve`` refuses to start without all three.
    tls_cert: str = ""
    tls_key: str = ""
    tls_ca: str = ""
    state_dir: str = "/var/lib/rawvm"
    sink: str = ""  # where logs and telemetry go on stop: a directory, file:// URL, or http(s) PUT URL
    # Form fields of an HTTP POST sink (an S3 presigned POST: key, policy, signature...); empty: PUT to ``sink``.
    # Secret-ish (the policy's signature): never logged. Not hashed: a dict is not hashable.
    sink_form: dict[str, str] = field(default_factory=dict, hash=False, repr=False)
    secret_env: tuple[str, ...] = ()  # env var names whose values are redacted from every log
    bundle: BundleConfig = BundleConfig()
    install: InstallConfig = InstallConfig()
    idle: IdleConfig = IdleConfig()
    telemetry: TelemetryConfig = TelemetryConfig()
    spot: SpotConfig = SpotConfig()
    tasks: TaskConfig = TaskConfig()
    batch: BatchConfig = BatchConfig()
    limits: LimitsConfig = LimitsConfig()

    def token_digest(self) -> bytes:
        """The sha256 of the bearer token, from ``token_sha256`` or from the token itself."""
        if self.token_sha256:
            if not _SHA256_HEX.fullmatch(self.token_sha256):
                raise ConfigError("agent.toml: 'token_sha256' must be 64 lowercase hex digits")
            return bytes.fromhex(self.token_sha256)
        if self.token:
            return hashlib.sha256(self.token.encode()).digest()
        if self.token_file:
            return hashlib.sha256(Path(self.token_file).read_text().strip().encode()).digest()
        raise ConfigError(
            "agent.toml: set 'token_sha256' (or 'token' / 'token_file'); the agent API never runs without one"
        )

    def check_channel(self) -> None:
        """The API serves only mutual TLS: a config without its certificate, key and CA is refused."""
        if not (self.tls_cert and self.tls_key and self.tls_ca):
            raise ConfigError(
                "agent.toml: the agent API serves only mutual TLS: set tls_cert, tls_key and tls_ca "
                "(rawvm's launch writes them)"
            )


_SHA256_HEX = re.compile(r"[0-9a-f]{64}")


_DURATIONS = {"keepalive", "client_timeout", "window", "max_lifetime", "interval", "ring_seconds", "poll", "uv_wait"}
_SECTIONS: dict[str, type[Any]] = {
    "install": InstallConfig,
    "idle": IdleConfig,
    "telemetry": TelemetryConfig,
    "spot": SpotConfig,
    "tasks": TaskConfig,
    "batch": BatchConfig,
    "limits": LimitsConfig,
}


def _build(cls: type[Any], raw: dict[str, Any], where: str) -> Any:
    known = {f.name: f for f in fields(cls)}
    kwargs: dict[str, Any] = {}
    for key, value in raw.items():
        if key not in known:
            raise ConfigError(f"agent.toml: unknown key '{where}{key}'")
        if key in _DURATIONS:
            try:
                value = parse_duration(value)
            except ValueError as exc:
                raise ConfigError(f"agent.toml: '{where}{key}': {exc}") from None
        elif isinstance(value, list):
            value = tuple(value)
        kwargs[key] = value
    return cls(**kwargs)


def config_from_dict(raw: dict[str, Any]) -> AgentConfig:
    raw = dict(raw)
    sections: dict[str, Any] = {}
    for name, cls in _SECTIONS.items():
        if name in raw:
            sections[name] = _build(cls, raw.pop(name), f"{name}.")
    if "bundle" in raw:
        bundle_raw = dict(raw.pop("bundle"))
        files = tuple(_build(BundleFile, f, "bundle.files.") for f in bundle_raw.pop("files", []))
        sections["bundle"] = BundleConfig(files=files, **bundle_raw)
    top = _build(AgentConfig, raw, "")
    form = top.sink_form
    if not isinstance(form, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in form.items()):
        raise ConfigError("agent.toml: 'sink_form' must be a table of string fields (an S3 presigned POST's)")
    return AgentConfig(**{**{f.name: getattr(top, f.name) for f in fields(AgentConfig)}, **sections})


def config_to_dict(config: AgentConfig) -> dict[str, Any]:
    """The TOML-ready form (tuples become lists); ``config_from_dict`` reads it back unchanged."""

    def plain(obj: Any) -> Any:
        if hasattr(obj, "__dataclass_fields__"):
            return {f.name: plain(getattr(obj, f.name)) for f in fields(obj)}
        if isinstance(obj, tuple | list):
            return [plain(x) for x in obj]
        if isinstance(obj, dict):
            return dict(obj)  # a copy: the config stays untouched
        return obj

    out: dict[str, Any] = plain(config)
    return out


def load_config(path: str | Path) -> AgentConfig:
    try:
        raw = tomllib.loads(Path(path).read_text())
    except FileNotFoundError:
        raise ConfigError(f"agent config not found: {path}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"agent config {path} is not valid TOML: {exc}") from None
    return config_from_dict(raw)
