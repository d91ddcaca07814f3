"""What a Dask cluster was asked for, and the checks made before anything launches (importing this module does
not need the ``dask`` extra)."""

from __future__ import annotations

import tomllib
from dataclasses import dataclass
from pathlib import Path

from rawvm_agent.durations import format_duration

from rawvm.errors import UsageError
from rawvm.options import LaunchOptions


def idle_split(keepalive_s: float) -> tuple[float, float]:
    """``keepalive`` as (the scheduler's idle timeout, the agents' own keepalive): together they make it, so a
    lost laptop costs at most ``keepalive``. The agents' part is a grace between a Dask process ending and the
    machine powering off: 5 s to 60 s, a quarter of the whole."""
    grace = min(60.0, max(5.0, keepalive_s / 4))
    if keepalive_s < 2 * grace:
        raise UsageError(f"--keepalive {format_duration(keepalive_s)} is too short for a Dask cluster: use 20s or more")
    return keepalive_s - grace, grace


@dataclass(frozen=True)
class DaskOptions:
    """What ``dask_cluster`` was asked for; every launch of the cluster uses it."""

    name: str
    """The cluster's name; its second and later launches are ``NAME-2``, ``NAME-3``, ..."""

    launch: LaunchOptions
    """The machine, lifetime and environment options every launch of the cluster starts from."""

    scheduler_vm_type: str = ""
    """The scheduler machine's own instance type ("": the workers' kind)."""

    dedicated_scheduler: bool = True
    """The scheduler on a machine of its own (False: on the first worker's machine)."""

    @property
    def provider(self) -> str:
        return self.launch.request.provider


def check_environment(bundle_dir: Path) -> bool:
    """Refuse a locked environment without ``distributed`` (one line); returns whether it has dask-cuda."""
    try:
        packages = tomllib.loads((bundle_dir / "pylock.toml").read_text(encoding="utf-8")).get("packages", [])
    except (OSError, tomllib.TOMLDecodeError):
        packages = []
    names = {str(p.get("name", "")).lower().replace("_", "-") for p in packages}
    names |= {p.name.split("-", 1)[0].lower().replace("_", "-") for p in (bundle_dir / "wheels").glob("*.whl")}
    if "distributed" not in names:
        raise UsageError(
            "the environment has no 'distributed': add it (pip install distributed, or to its requirements) so "
            "the machines can run Dask's scheduler and workers"
        )
    return "dask-cuda" in names
