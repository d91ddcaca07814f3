"""Choosing EC2 instance types from ``cpu``, ``memory``, ``gpu``, ``arm`` (DescribeInstanceTypes, cached on disk).

The rule (documented, deterministic, no price API needed):

1. A type fits when it is current generation, not bare metal, not burstable (``t*``: CPU credits run out under
   sustained work), has the architecture asked for, at least ``cpu`` vCPUs and ``memory`` GiB, and NVIDIA GPUs
   exactly when ``gpu`` is asked (none otherwise: GPU types cost several times more). With ``spot``, the type
   must be offered as spot.
2. Fitting types are ranked smallest first: fewest GPUs, then fewest vCPUs, then least memory, then name. EC2
   prices scale with vCPUs and memory within a generation, so the smallest fitting type is the cheapest one
   to within a few percent; the runners-up are the fallbacks a fleet may use when capacity is short.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from botocore.exceptions import BotoCoreError, ClientError

from rawvm_images.ec2 import CatalogError

CACHE_TTL_SECONDS = 7 * 24 * 3600.0  # EC2 adds types a few times a year; a week-old list is fine
DEFAULT_MIN_CPU = 2  # with nothing asked: 1-vCPU types install an environment too slowly to be worth it
_ARCH_FROM_EC2 = {"x86_64": "x86_64", "arm64": "aarch64"}


@dataclass(frozen=True)
class InstanceType:
    name: str
    vcpus: int
    memory_gib: float
    arches: tuple[str, ...]  # x86_64 and/or aarch64
    gpus: int = 0  # NVIDIA GPUs
    gpu_memory_gib: float = 0.0
    spot: bool = True
    current_generation: bool = True
    bare_metal: bool = False
    burstable: bool = False

    @property
    def family(self) -> str:
        return self.name.split(".", 1)[0]


def from_api(item: dict[str, Any]) -> InstanceType:
    """One ``InstanceTypes`` entry of DescribeInstanceTypes."""
    gpus = [g for g in item.get("GpuInfo", {}).get("Gpus", []) if g.get("Manufacturer") == "NVIDIA"]
    return InstanceType(
        name=item["InstanceType"],
        vcpus=int(item["VCpuInfo"]["DefaultVCpus"]),
        memory_gib=round(item["MemoryInfo"]["SizeInMiB"] / 1024, 3),
        arches=tuple(_ARCH_FROM_EC2[a] for a in item["ProcessorInfo"]["SupportedArchitectures"] if a in _ARCH_FROM_EC2),
        gpus=sum(int(g.get("Count", 0)) for g in gpus),
        gpu_memory_gib=round(item.get("GpuInfo", {}).get("TotalGpuMemoryInMiB", 0) / 1024, 3),
        spot="spot" in item.get("SupportedUsageClasses", []),
        current_generation=bool(item.get("CurrentGeneration", False)),
        bare_metal=bool(item.get("BareMetal", False)),
        burstable=bool(item.get("BurstablePerformanceSupported", False)),
    )


def default_cache_dir() -> Path:
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "rawvm" / "instance-types"


def describe_instance_types(
    ec2: Any,
    *,
    cache_dir: Path | None = None,
    ttl: float = CACHE_TTL_SECONDS,
    now: Callable[[], float] = time.time,
) -> list[InstanceType]:
    """Every instance type of the client's region: from the disk cache when younger than ``ttl``, else the API."""
    region = ec2.meta.region_name
    path = (cache_dir or default_cache_dir()) / f"{region}.json"
    try:
        cached = json.loads(path.read_text())
        if now() - float(cached["fetched_at"]) < ttl:
            return [InstanceType(**{**t, "arches": tuple(t["arches"])}) for t in cached["types"]]
    except (OSError, ValueError, KeyError, TypeError):
        pass
    try:
        pages = ec2.get_paginator("describe_instance_types").paginate()
        types = sorted((from_api(item) for page in pages for item in page["InstanceTypes"]), key=lambda t: t.name)
    except (ClientError, BotoCoreError) as exc:
        raise CatalogError(f"cannot list EC2 instance types in {region}: {exc}") from None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"fetched_at": now(), "types": [asdict(t) for t in types]}))
        tmp.replace(path)
    except OSError:
        pass  # an unwritable cache only costs a lookup next time
    return types


def fits(t: InstanceType, *, cpu: int, memory_gib: float, gpu: bool, arch: str, spot: bool) -> bool:
    return (
        t.current_generation
        and not t.bare_metal
        and not t.burstable
        and arch in t.arches
        and t.vcpus >= cpu
        and t.memory_gib >= memory_gib
        and (t.gpus > 0) == gpu
        and (t.spot or not spot)
    )


def _rank(t: InstanceType) -> tuple[int, int, float, str]:
    return (t.gpus, t.vcpus, t.memory_gib, t.name)


def choose_instance_types(
    types: Iterable[InstanceType],
    *,
    cpu: int = 0,
    memory_gib: float = 0.0,
    gpu: bool = False,
    arm: bool = False,
    spot: bool = False,
    limit: int = 3,
) -> list[InstanceType]:
    """Up to ``limit`` fitting types, cheapest first (see the module docstring for the rule)."""
    arch = "aarch64" if arm else "x86_64"
    cpu = cpu or DEFAULT_MIN_CPU
    fitting = sorted(
        (t for t in types if fits(t, cpu=cpu, memory_gib=memory_gib, gpu=gpu, arch=arch, spot=spot)), key=_rank
    )
    if not fitting:
        wanted = f"{cpu} vCPUs, {memory_gib:g} GiB, {'an NVIDIA GPU' if gpu else 'no GPU'}, {arch}"
        raise CatalogError(f"no current EC2 instance type has {wanted}; ask for less or name one with --vm-type")
    return fitting[:limit]


def lookup(types: Iterable[InstanceType], name: str, region: str) -> InstanceType:
    """The named type, or a clear error when the region does not offer it."""
    for t in types:
        if t.name == name:
            return t
    raise CatalogError(
        f"unknown instance type {name!r} in {region}: check the name (e.g. c7i.large) or pick another region"
    )
