"""The GPU fields under dcgm-exporter's names, so Grafana dashboards made for DCGM work on rawvm machines.

Names, types, units and HELP follow dcgm-exporter's ``etc/default-counters.csv`` (memory in MiB, clocks in MHz,
power in W, energy in mJ, utilization in %, ``DCGM_FI_DEV_XID_ERRORS`` the last XID code, 0 when none) and its
labels ``gpu``, ``UUID``, ``device`` (``nvidia<N>``), ``modelName``, ``Hostname``. No ``pci_bus_id``: the agent
does not read it.

Two renderings of the same readings, because dcgm-exporter's own output does not pass ``promtool check metrics``
(promlint rejects the camelCase label ``modelName`` and a counter without ``_total``):

- ``families(..., exact=False)``, appended to ``/metrics``: the gauges only, without ``modelName`` (the model is
  in ``rawvm_gpu_info{name=…}``), so the whole page stays lint-clean;
- ``families(..., exact=True)``, served alone at ``/metrics/dcgm``: every field with dcgm-exporter's full label
  set and types, for dashboards that group by ``modelName`` (scrape that path instead).

Rendering runs per scrape from the newest sample; the sampling loop does no extra work. The profiling fields
(``DCGM_FI_PROF_*``, from NVML GPM where the GPU has it) follow the same two renderings.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from typing import Any

from rawvm_agent.telemetry.prometheus import family

MIB = 1 << 20

Gpu = Mapping[str, Any]

# (name, type, HELP as dcgm-exporter writes it, the value from one GPU's reading or None when it lacks it)
_FIELDS: tuple[tuple[str, str, str, Callable[[Gpu], float | None]], ...] = (
    ("DCGM_FI_DEV_SM_CLOCK", "gauge", "SM clock frequency (in MHz).", lambda g: _div(g.get("sm_clock_hertz"), 10**6)),
    (
        "DCGM_FI_DEV_MEM_CLOCK",
        "gauge",
        "Memory clock frequency (in MHz).",
        lambda g: _div(g.get("memory_clock_hertz"), 10**6),
    ),
    ("DCGM_FI_DEV_GPU_TEMP", "gauge", "GPU temperature (in C).", lambda g: g.get("temperature_celsius")),
    ("DCGM_FI_DEV_POWER_USAGE", "gauge", "Power draw (in W).", lambda g: g.get("power_watts")),
    (
        "DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION",
        "counter",
        "Total energy consumption since boot (in mJ).",
        lambda g: None if g.get("energy_joules") is None else round(float(g["energy_joules"]) * 1000),
    ),
    ("DCGM_FI_DEV_GPU_UTIL", "gauge", "GPU utilization (in %).", lambda g: g.get("utilization_gpu_percent")),
    ("DCGM_FI_DEV_MEM_COPY_UTIL", "gauge", "Memory utilization (in %).", lambda g: g.get("utilization_memory_percent")),
    (
        "DCGM_FI_DEV_XID_ERRORS",
        "gauge",
        "Value of the last XID error encountered.",
        lambda g: int(g.get("xid_last", 0)),
    ),
    ("DCGM_FI_DEV_FB_FREE", "gauge", "Framebuffer memory free (in MiB).", lambda g: _fb_free(g)),
    (
        "DCGM_FI_DEV_FB_USED",
        "gauge",
        "Framebuffer memory used (in MiB).",
        lambda g: _div(g.get("memory_used_bytes"), MIB),
    ),
    (
        "DCGM_FI_DEV_CLOCK_THROTTLE_REASONS",
        "gauge",
        "Current clock throttle reasons (bitmask of DCGM_CLOCKS_THROTTLE_REASON_*).",
        lambda g: g.get("clock_event_reasons"),
    ),
)


# The profiling (DCP) fields from NVML GPM (collectors/gpm.py): (name, HELP as dcgm-exporter's CSVs write it, the
# sample key, its divisor). DCGM reports the activities as ratios 0-1 (its dashboard's "percentunit"), the sample
# has percentages; PCIe and NVLink are rates in bytes per second, gauges as in dcgm-exporter's
# dcp-metrics-included.csv. GR_ENGINE_ACTIVE comes along: dcgm-exporter's default counters enable it.
PROFILING_FIELDS: tuple[tuple[str, str, str, int], ...] = (
    ("DCGM_FI_PROF_GR_ENGINE_ACTIVE", "Ratio of time the graphics engine is active.", "graphics_active_percent", 100),
    (
        "DCGM_FI_PROF_SM_ACTIVE",
        "The ratio of cycles an SM has at least 1 warp assigned.",
        "sm_active_percent",
        100,
    ),
    ("DCGM_FI_PROF_SM_OCCUPANCY", "The ratio of number of warps resident on an SM.", "sm_occupancy_percent", 100),
    (
        "DCGM_FI_PROF_PIPE_TENSOR_ACTIVE",
        "Ratio of cycles the tensor (HMMA) pipe is active.",
        "tensor_active_percent",
        100,
    ),
    (
        "DCGM_FI_PROF_DRAM_ACTIVE",
        "Ratio of cycles the device memory interface is active sending or receiving data.",
        "dram_active_percent",
        100,
    ),
    ("DCGM_FI_PROF_PIPE_FP64_ACTIVE", "Ratio of cycles the fp64 pipes are active.", "fp64_active_percent", 100),
    ("DCGM_FI_PROF_PIPE_FP32_ACTIVE", "Ratio of cycles the fp32 pipes are active.", "fp32_active_percent", 100),
    ("DCGM_FI_PROF_PIPE_FP16_ACTIVE", "Ratio of cycles the fp16 pipes are active.", "fp16_active_percent", 100),
    (
        "DCGM_FI_PROF_PCIE_TX_BYTES",
        "The rate of data transmitted over the PCIe bus - including both protocol headers and data payloads - "
        "in bytes per second.",
        "pcie_transmit_bytes_per_second",
        1,
    ),
    (
        "DCGM_FI_PROF_PCIE_RX_BYTES",
        "The rate of data received over the PCIe bus - including both protocol headers and data payloads - "
        "in bytes per second.",
        "pcie_receive_bytes_per_second",
        1,
    ),
    (
        "DCGM_FI_PROF_NVLINK_TX_BYTES",
        "The rate of data transmitted over NVLink, all links, in bytes per second.",
        "nvlink_transmit_bytes_per_second",
        1,
    ),
    (
        "DCGM_FI_PROF_NVLINK_RX_BYTES",
        "The rate of data received over NVLink, all links, in bytes per second.",
        "nvlink_receive_bytes_per_second",
        1,
    ),
)


def profiling_families(entries: list[dict[str, Any]], hostname: str, *, exact: bool = False) -> Iterator[str]:
    """The ``DCGM_FI_PROF_*`` gauges for one sample's ``gpu_profiling`` list; a GPU without a field has no
    sample in that family, and a family no GPU has renders nothing."""
    per_gpu = [(g, labels(g, hostname, exact=exact)) for g in entries]
    for name, help, key, divisor in PROFILING_FIELDS:
        samples = [(lbl, g[key] / divisor if divisor != 1 else g[key]) for g, lbl in per_gpu if key in g]
        yield family(name, "gauge", help, samples)


def _div(value: Any, by: int) -> int | None:
    return None if value is None else int(value) // by


def _fb_free(gpu: Gpu) -> int | None:
    total, used = gpu.get("memory_total_bytes"), gpu.get("memory_used_bytes")
    if total is None or used is None:
        return None
    return max(int(total) - int(used), 0) // MIB


def labels(gpu: Gpu, hostname: str, *, exact: bool) -> dict[str, str]:
    """dcgm-exporter's label set, in its order; ``modelName`` only in the exact rendering."""
    index = str(gpu["index"])
    out = {"gpu": index, "UUID": str(gpu.get("uuid", "")), "device": f"nvidia{index}"}
    if exact:
        out["modelName"] = str(gpu.get("name", ""))
    out["Hostname"] = hostname
    return out


def families(gpus: list[dict[str, Any]], hostname: str, *, exact: bool = False) -> Iterator[str]:
    """The DCGM families for these GPU readings (one sample's ``gpu`` list)."""
    per_gpu = [(g, labels(g, hostname, exact=exact)) for g in gpus]
    for name, type, help, value_of in _FIELDS:
        if type == "counter" and not exact:
            continue  # promlint wants counters to end in _total; /metrics has rawvm_gpu_energy_joules_total
        samples = [(lbl, value) for g, lbl in per_gpu if (value := value_of(g)) is not None]
        yield _family(name, type, help, samples)


def _family(name: str, type: str, help: str, samples: list[tuple[dict[str, str], float]]) -> str:
    if type != "counter":
        return family(name, type, help, samples)
    # dcgm-exporter's counters do not end in _total, which prometheus.family (rightly) refuses for our own names.
    text = family(name + "_total", type, help, samples)
    return text.replace(name + "_total", name)
