"""A cluster's flushes on this host: what its machines sent to the sink as they stopped (task output, agent log,
telemetry), kept under ``<state dir>/sinks/<cluster>/`` so ``rawvm logs``, ``batch status`` and ``report`` work after
the machines, and even the cluster record, are gone.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import TextIO

from rawvm import clusters
from rawvm.errors import RawvmError
from rawvm.files import records_dir, write_private_json
from rawvm.providers import get_provider
from rawvm.providers.base import Provider
from rawvm.session import StreamWriter, say


def sink_dir(cluster: str) -> Path:
    """Where this host keeps a cluster's flushes, one directory each (``<cluster>-<label>-<UTC>/``): the local
    provider's sink, and what ``fetch_sink`` unpacks. Nothing else lives there: flushes are what machines sent,
    untrusted, so this host's own records are in ``files.records_dir(cluster)``."""
    return clusters.state_dir() / "sinks" / cluster


SINK_PROVIDER_FILE = "provider.json"


def remember_sink_provider(cluster: str, provider: str, options: dict[str, str]) -> None:
    """Note the cluster's provider (and e.g. its region) in its laptop-only records: once ``rawvm ls`` has
    forgotten the cluster, ``rawvm logs`` still knows where the flushes are."""
    write_private_json(records_dir(cluster) / SINK_PROVIDER_FILE, {"provider": provider, "options": options})


def remembered_provider(cluster: str) -> Provider | None:
    """The provider noted at launch; None when there is no note (a cluster launched before notes were kept, or
    before they moved out of the sink directory: only its local flushes can be read)."""
    try:
        raw = json.loads((records_dir(cluster) / SINK_PROVIDER_FILE).read_text())
        name, options = str(raw["provider"]), {str(k): str(v) for k, v in dict(raw.get("options", {})).items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None
    return get_provider(name, **options)


def fetch_flushes(cluster: str, provider: Provider | None) -> int:
    """Bring the cluster's flushes into ``sink_dir`` with the provider's ``fetch_sink`` hook (local machines
    flush there directly; None: no provider is known). A failure is said, not raised: what was fetched before
    still shows."""
    if provider is None:
        return 0
    try:
        return provider.fetch_sink(cluster, sink_dir(cluster))
    except RawvmError as exc:
        say(f"{cluster}: cannot fetch the logs its machines flushed: {exc}")
        return 0


def flush_owner(cluster: str, name: str) -> str:
    """The machine of the flush directory ``<cluster>-<machine>-<UTC time>``. A qemu agent's machine id starts
    with the cluster already (``<cluster>-<cluster>-<id>-<UTC>``): that repeat is dropped to give the short id."""
    return name[len(cluster) + 1 :].rsplit("-", 1)[0].removeprefix(f"{cluster}-")


def flushes(cluster: str) -> dict[str, list[Path]]:
    """Each machine's flush directories in this host's sink directory, oldest first."""
    found: dict[str, list[Path]] = {}
    for path in sorted(sink_dir(cluster).glob(f"{cluster}-*-*")):
        if path.is_dir():
            found.setdefault(flush_owner(cluster, path.name), []).append(path)
    return found


def flushed_machines(cluster: str) -> list[str]:
    """Machines of ``cluster`` whose flushed logs are in this host's sink directory (local machines flush there
    themselves; ``fetch_flushes`` brings those of the other providers)."""
    return sorted(flushes(cluster))


def print_flushed_logs(cluster: str, mid: str, prefix: str, output: TextIO, error_output: TextIO) -> bool:
    """The latest task's output from the last flush ``mid`` made to the sink; False when there is none."""
    made = flushes(cluster).get(mid, [])
    if not made:
        return False
    tasks = []
    for record_path in made[-1].glob("tasks/*/task.json"):
        with contextlib.suppress(OSError, ValueError):
            tasks.append((float(json.loads(record_path.read_text()).get("started_at") or 0), record_path.parent))
    if not tasks:
        return False
    task_dir = max(tasks)[1]
    for stream, out in (("stdout", output), ("stderr", error_output)):
        writer = StreamWriter(out, prefix)
        with contextlib.suppress(FileNotFoundError):
            writer.write((task_dir / stream).read_bytes())
        writer.close()
    say(f"{mid} has stopped: this is the output it flushed to {made[-1]}")
    return True
