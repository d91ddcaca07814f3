"""One collector per source, node_exporter style: each reads its source and fails alone."""

from __future__ import annotations

from rawvm_agent.telemetry.collectors.base import Collector
from rawvm_agent.telemetry.collectors.cpu import CpuCollector
from rawvm_agent.telemetry.collectors.disk import DiskCollector
from rawvm_agent.telemetry.collectors.gpm import GpmCollector
from rawvm_agent.telemetry.collectors.gpu import GpuCollector
from rawvm_agent.telemetry.collectors.load import LoadCollector
from rawvm_agent.telemetry.collectors.memory import MemoryCollector
from rawvm_agent.telemetry.collectors.network import NetworkCollector
from rawvm_agent.telemetry.collectors.processes import ProcessesCollector
from rawvm_agent.telemetry.collectors.tree import TreeCpuCollector, TreeMemoryCollector

__all__ = [
    "Collector",
    "CpuCollector",
    "DiskCollector",
    "GpmCollector",
    "GpuCollector",
    "LoadCollector",
    "MemoryCollector",
    "NetworkCollector",
    "ProcessesCollector",
    "TreeCpuCollector",
    "TreeMemoryCollector",
]
