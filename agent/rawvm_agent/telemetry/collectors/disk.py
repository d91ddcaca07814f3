"""Disk: filesystem usage per mount point and IO counters per block device."""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

import psutil

from rawvm_agent.telemetry.prometheus import family

# node_exporter's default device exclusion: partitions and pseudo devices double-count their disk.
_SKIP_DEVICE = re.compile(r"^(z?ram|loop|fd|(h|s|v|xv)d[a-z]|nvme\d+n\d+p)\d+$")
_REFRESH_MOUNTS_EVERY = 60  # ticks; mounts rarely change, and listing them costs more than statvfs


class DiskCollector:
    name = "disk"

    def __init__(self) -> None:
        self._mounts: list[Any] = []
        self._ticks = 0

    def collect(self) -> dict[str, Any]:
        if self._ticks % _REFRESH_MOUNTS_EVERY == 0:
            self._mounts = psutil.disk_partitions(all=False)
        self._ticks += 1
        filesystems = []
        for part in self._mounts:
            try:
                usage = psutil.disk_usage(part.mountpoint)
            except OSError:
                continue  # unmounted since the listing, or not readable: that mount only
            filesystems.append(
                {
                    "mountpoint": part.mountpoint,
                    "device": part.device,
                    "fstype": part.fstype,
                    "size_bytes": usage.total,
                    "used_bytes": usage.used,
                    "avail_bytes": usage.free,
                }
            )
        io = {}
        for device, c in (psutil.disk_io_counters(perdisk=True, nowrap=True) or {}).items():
            if _SKIP_DEVICE.match(device):
                continue
            io[device] = {
                "read_bytes": c.read_bytes,
                "written_bytes": c.write_bytes,
                "reads": c.read_count,
                "writes": c.write_count,
                "io_time_seconds": getattr(c, "busy_time", 0) / 1000.0,
            }
        return {"filesystems": filesystems, "io": io}

    def metrics(self, value: dict[str, Any]) -> Iterator[str]:
        filesystems = value["filesystems"]

        def fs_samples(key: str) -> list[tuple[dict[str, str], float]]:
            return [
                ({"mountpoint": fs["mountpoint"], "device": fs["device"], "fstype": fs["fstype"]}, fs[key])
                for fs in filesystems
            ]

        yield family("rawvm_filesystem_size_bytes", "gauge", "Filesystem size in bytes.", fs_samples("size_bytes"))
        yield family(
            "rawvm_filesystem_used_bytes", "gauge", "Filesystem space used, in bytes.", fs_samples("used_bytes")
        )
        yield family(
            "rawvm_filesystem_avail_bytes",
            "gauge",
            "Filesystem space available to non-root users, in bytes.",
            fs_samples("avail_bytes"),
        )
        io = value["io"]
        for key, name, help in (
            ("read_bytes", "rawvm_disk_read_bytes_total", "Bytes read from the device."),
            ("written_bytes", "rawvm_disk_written_bytes_total", "Bytes written to the device."),
            ("reads", "rawvm_disk_reads_completed_total", "Reads completed by the device."),
            ("writes", "rawvm_disk_writes_completed_total", "Writes completed by the device."),
            ("io_time_seconds", "rawvm_disk_io_time_seconds_total", "Seconds the device spent doing IO."),
        ):
            yield family(name, "counter", help, [({"device": dev}, c[key]) for dev, c in io.items()])

    def close(self) -> None:
        pass
