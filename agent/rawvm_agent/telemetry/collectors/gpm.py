"""GPU profiling metrics through NVML GPM (Hopper and later): SM, tensor, DRAM and pipe activity, PCIe and NVLink.

Why a collector of its own: GPM is a separate NVML API that many GPUs lack (Ampere and older answer
``isSupportedDevice = 0``, older drivers lack the functions); node_exporter style, it fails alone and never
costs the GPU collector its readings. It shares that collector's ``nvmlInit`` and device handles.

GPM measures over an interval: each tick fills one of two samples per GPU (``nvmlGpmSampleGet``) and asks
``nvmlGpmMetricsGet`` for every metric between the previous sample and this one, so the first tick has no
values, and a value covers exactly one sampling interval. A metric the GPU answers with an error in its own slot
(NVLink metrics on a GPU without NVLink) is absent from that GPU's entry; a GPU without GPM has no entry at all,
so the ``DCGM_FI_PROF_*`` series are left out, never reported as 0.

Sample value (key ``gpu_profiling``): a list, one map per GPU that has readings: ``index``, ``uuid``, ``name``
and the keys of ``METRICS`` (percentages 0-100 and bytes per second, as units in the key names).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from rawvm_agent.telemetry import dcgm
from rawvm_agent.telemetry.collectors.gpu import GpuCollector

log = logging.getLogger("rawvm_agent.telemetry.gpm")

MIB = 1 << 20

# sample key → (pynvml metric constant, factor from NVML's unit to the key's unit)
METRICS: dict[str, tuple[str, float]] = {
    "graphics_active_percent": ("NVML_GPM_METRIC_GRAPHICS_UTIL", 1.0),
    "sm_active_percent": ("NVML_GPM_METRIC_SM_UTIL", 1.0),
    "sm_occupancy_percent": ("NVML_GPM_METRIC_SM_OCCUPANCY", 1.0),
    "tensor_active_percent": ("NVML_GPM_METRIC_ANY_TENSOR_UTIL", 1.0),
    "dram_active_percent": ("NVML_GPM_METRIC_DRAM_BW_UTIL", 1.0),
    "fp64_active_percent": ("NVML_GPM_METRIC_FP64_UTIL", 1.0),
    "fp32_active_percent": ("NVML_GPM_METRIC_FP32_UTIL", 1.0),
    "fp16_active_percent": ("NVML_GPM_METRIC_FP16_UTIL", 1.0),
    "pcie_transmit_bytes_per_second": ("NVML_GPM_METRIC_PCIE_TX_PER_SEC", MIB),
    "pcie_receive_bytes_per_second": ("NVML_GPM_METRIC_PCIE_RX_PER_SEC", MIB),
    "nvlink_transmit_bytes_per_second": ("NVML_GPM_METRIC_NVLINK_TOTAL_TX_PER_SEC", MIB),
    "nvlink_receive_bytes_per_second": ("NVML_GPM_METRIC_NVLINK_TOTAL_RX_PER_SEC", MIB),
}


@dataclass
class _GpmDevice:
    index: int
    uuid: str
    name: str
    handle: Any
    samples: list[Any]  # two nvmlGpmSample_t, used in turn
    request: Any  # its nvmlGpmMetricsGet_t (about 19 KB), metric ids filled once, reused every tick
    newest: int = -1  # which of the two holds the last sample taken; -1: none yet


class GpmCollector:
    name = "gpu_profiling"

    def __init__(self, gpu: GpuCollector) -> None:
        self._nvml: Any = gpu.nvml
        self._devices: list[_GpmDevice] = []
        self.hostname = gpu.hostname
        if self._nvml is None or not hasattr(self._nvml, "nvmlGpmQueryDeviceSupport"):
            return  # no NVML, or an nvidia-ml-py from before GPM: no GPU has readings, nothing fails
        nvml = self._nvml
        self._metric_ids = [(key, int(getattr(nvml, constant)), factor) for key, (constant, factor) in METRICS.items()]
        for index, uuid, name, handle in gpu.handles():
            samples: list[Any] = []
            try:
                if not nvml.nvmlGpmQueryDeviceSupport(handle).isSupportedDevice:
                    continue
                for _ in range(2):
                    samples.append(nvml.nvmlGpmSampleAlloc())
            except nvml.NVMLError as exc:  # FunctionNotFound on drivers without GPM, NotSupported, …
                log.info("GPU %d: no GPM: %s", index, exc)
                self._free(samples)  # the one allocated before the other failed
                continue
            self._devices.append(_GpmDevice(index, uuid, name, handle, samples, self._request()))
        if self._devices:
            log.info("NVML GPM: %d GPU(s)", len(self._devices))

    def _request(self) -> Any:
        request = self._nvml.c_nvmlGpmMetricsGet_t()
        request.version = self._nvml.NVML_GPM_METRICS_GET_VERSION
        request.numMetrics = len(self._metric_ids)
        for i, (_, metric_id, _) in enumerate(self._metric_ids):
            request.metrics[i].metricId = metric_id
        return request

    @property
    def count(self) -> int:
        """GPUs with GPM."""
        return len(self._devices)

    def collect(self) -> list[dict[str, Any]]:
        out = []
        for device in self._devices:
            entry = self._read(device)
            if entry is not None:
                out.append(entry)
        return out

    def _read(self, device: _GpmDevice) -> dict[str, Any] | None:
        nvml = self._nvml
        slot = 1 - device.newest if device.newest >= 0 else 0
        try:
            nvml.nvmlGpmSampleGet(device.handle, device.samples[slot])
        except nvml.NVMLError as exc:
            log.debug("GPU %d: nvmlGpmSampleGet: %s", device.index, exc)
            device.newest = -1  # the next interval starts from a fresh sample
            return None
        previous, device.newest = device.newest, slot
        if previous < 0:
            return None  # one sample is no interval yet
        request = device.request
        request.sample1 = device.samples[previous]
        request.sample2 = device.samples[slot]
        try:
            nvml.nvmlGpmMetricsGet(request)
        except nvml.NVMLError as exc:
            log.debug("GPU %d: nvmlGpmMetricsGet: %s", device.index, exc)
            return None
        entry: dict[str, Any] = {"index": device.index, "uuid": device.uuid, "name": device.name}
        for i, (key, _, factor) in enumerate(self._metric_ids):
            metric = request.metrics[i]
            if metric.nvmlReturn != nvml.NVML_SUCCESS or not math.isfinite(metric.value):
                continue  # this metric only: absent, never 0
            value = metric.value * factor
            entry[key] = round(value) if factor != 1.0 else round(value, 3)
        return entry

    def close(self) -> None:
        """Free the GPM samples; runs before the GPU collector shuts NVML down (the sampler's order)."""
        for device in self._devices:
            self._free(device.samples)
        self._devices = []

    def _free(self, samples: list[Any]) -> None:
        for sample in samples:
            try:
                self._nvml.nvmlGpmSampleFree(sample)
            except self._nvml.NVMLError as exc:
                log.debug("nvmlGpmSampleFree: %s", exc)

    # -- Prometheus -------------------------------------------------------------------------------------------

    def metrics(self, value: list[dict[str, Any]]) -> Iterator[str]:
        """dcgm-exporter's ``DCGM_FI_PROF_*`` gauges with /metrics's lint-clean labels."""
        return dcgm.profiling_families(value, self.hostname)

    def dcgm_metrics(self, value: list[dict[str, Any]]) -> Iterator[str]:
        """The same with dcgm-exporter's full label set (``/metrics/dcgm``)."""
        return dcgm.profiling_families(value, self.hostname, exact=True)
