"""Telemetry: CPU, memory, disk, network, load, processes and GPUs sampled at 1 Hz into a ring and onto disk.

``Sampler`` is what the agent uses; ``prometheus.family`` renders any other family for /metrics.
"""

from __future__ import annotations

from rawvm_agent.telemetry import prometheus
from rawvm_agent.telemetry.prometheus import CONTENT_TYPE, family
from rawvm_agent.telemetry.sample import Sample
from rawvm_agent.telemetry.sampler import Sampler

__all__ = ["CONTENT_TYPE", "Sample", "Sampler", "family", "prometheus"]
