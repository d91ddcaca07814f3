"""Local records of clusters, so ``rawvm ls``, ``logs`` and ``down`` work across invocations.

One JSON file per cluster under ``$RAWVM_STATE_DIR`` (default ``~/.local/state/rawvm``)``/clusters/``. The
files hold the agents' bearer token, so the directory is 0700 and each file 0600, written atomically. Beside
each, ``<name>.tls/`` (0700) holds the cluster CA's certificate and the laptop's client certificate and key
(0600) of the mutual-TLS agent channel (``rawvm.agent.tls``); ``ClusterRecord.agent_ssl_context`` is the one
place a client's TLS context is made.
"""

from __future__ import annotations

import functools
import json
import re
import secrets
import shutil
import ssl
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from rawvm.agent.tls import ChannelFiles, ServerCredentials, client_context, make_channel
from rawvm.errors import RawvmError, UsageError
from rawvm.files import state_dir as state_dir  # where every record lives; re-exported for callers
from rawvm.files import write_private_json
from rawvm.providers.base import Machine

_NAME = re.compile(r"[a-z0-9][a-z0-9-]{0,39}")


def clusters_dir() -> Path:
    path = state_dir() / "clusters"
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    return path


def check_name(name: str) -> str:
    """A cluster name is also an AWS tag value and a file name: lowercase letters, digits, dashes."""
    if not _NAME.fullmatch(name):
        raise UsageError(f"invalid cluster name {name!r}: use up to 40 lowercase letters, digits and dashes")
    return name


def new_name() -> str:
    return f"rawvm-{secrets.token_hex(3)}"


@dataclass
class ClusterRecord:
    name: str
    provider: str
    token: str = field(repr=False)
    created: float = field(default_factory=time.time)
    machines: list[Machine] = field(default_factory=list)
    keepalive_s: float = 0.0
    max_lifetime_s: float = 0.0
    provider_options: dict[str, str] = field(default_factory=dict)  # e.g. region, to find the machines again
    channel_dir: str = ""  # the agent channel's files (``channel_files``); "": where they go beside this record
    source: str = ""  # the environment it was locked from, absolute ("": the running one): run --cluster relocks it
    pypi_only: bool = False  # it was locked with --pypi-only
    project: str = ""  # the directory whose files it received as code ("": unknown, an older record)

    @property
    def price_per_hour(self) -> float:
        return sum(m.price_per_hour for m in self.machines)

    def agent_ssl_context(self) -> ssl.SSLContext:
        """The TLS context every client of this cluster's agents uses: pins the cluster CA, presents the laptop's
        certificate. Made once per process and cluster (loading the files costs a few ms; ``rawvm top`` follows
        hundreds of machines). A record without TLS files (an older rawvm's) is refused with one clear line."""
        files = ChannelFiles(Path(self.channel_dir)) if self.channel_dir else channel_files(self.name)
        try:
            stamp = files.client_key.stat().st_mtime_ns  # a cluster of the same name launched again: new files
        except OSError:
            stamp = 0
        return _context(files.directory, stamp)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> ClusterRecord:
        raw = dict(raw)
        machines = [Machine(**m) for m in raw.pop("machines", [])]
        return cls(machines=machines, **raw)


def channel_files(name: str) -> ChannelFiles:
    """Where cluster ``name``'s agent-channel files live (``<name>.tls/`` beside its record)."""
    return ChannelFiles(clusters_dir() / f"{check_name(name)}.tls")


def new_channel(name: str, lifetime_s: float) -> ServerCredentials:
    """A fresh CA and leaves for cluster ``name`` (valid ``lifetime_s`` and a margin): the laptop's files are
    written beside its record; the agents' certificate and key are returned for the provider to deliver."""
    files = channel_files(name)
    shutil.rmtree(files.directory, ignore_errors=True)  # a previous cluster's: never reuse a CA
    return make_channel(name, files.directory, lifetime_s)[1]


@functools.lru_cache(maxsize=64)
def _context(directory: Path, stamp: int) -> ssl.SSLContext:
    return client_context(ChannelFiles(directory))


def _path(name: str) -> Path:
    return clusters_dir() / f"{check_name(name)}.json"


def save(record: ClusterRecord) -> Path:
    path = _path(record.name)
    write_private_json(path, record.to_dict())  # 0600: it holds the agents' token
    return path


def load(name: str) -> ClusterRecord:
    path = _path(name)
    try:
        return ClusterRecord.from_dict(json.loads(path.read_text()))
    except FileNotFoundError:
        raise RawvmError(f"no cluster named {name!r} here: see 'rawvm ls'") from None
    except (ValueError, TypeError) as exc:
        raise RawvmError(f"the record of cluster {name!r} ({path}) is damaged: {exc}; remove it") from None


def exists(name: str) -> bool:
    return _path(name).is_file()


def all_records() -> list[ClusterRecord]:
    records = []
    for path in sorted(clusters_dir().glob("*.json")):
        try:
            records.append(load(path.stem))
        except RawvmError:
            continue  # one damaged file must not hide the others
    return sorted(records, key=lambda r: r.created)


def remove(name: str) -> None:
    _path(name).unlink(missing_ok=True)
    shutil.rmtree(channel_files(name).directory, ignore_errors=True)
