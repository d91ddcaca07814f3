"""GPU profiling metrics (NVML GPM) under dcgm-exporter's ``DCGM_FI_PROF_*`` names, 8 fake Hopper GPUs.

NVML's C library is faked (``pynvml.nvmlLib``, test_nvml_fakelib.py) and the real nvidia-ml-py GPM wrappers run
over it; the real agent app serves /metrics and /metrics/dcgm, and the real ``promtool`` checks both. Units are
DCGM's: the activities are ratios 0-1 (NVML GPM gives percentages), PCIe and NVLink rates bytes per second
(GPM gives MiB/s). Where a GPU has no GPM, or a metric answers an error, the series is absent, never 0.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pynvml
import pytest
from aiohttp import ClientSession
from aiohttp.test_utils import TestServer
from rawvm_agent.config import TelemetryConfig
from rawvm_agent.telemetry import Sampler

from tests.agent.test_metrics_prometheus import AUTH, ServerFactory, promtool_check, serve_agent
from tests.agent.test_nvml import prom_value
from tests.agent.test_nvml_fakelib import (
    GPM_NVLINK,
    CFunction,
    FakeNvmlLib,
    eight_gpm_gpus,
    eight_gpus,
    gpm_values,
    installed,
)
from tests.helpers.promtool import DCGM_EXPORTER_FINDINGS, promtool_findings

MIB = 1 << 20
# DCGM name → (GPM metric, divisor from GPM's unit to DCGM's: percent → ratio, MiB/s → bytes/s)
EXPECTED = {
    "DCGM_FI_PROF_GR_ENGINE_ACTIVE": (pynvml.NVML_GPM_METRIC_GRAPHICS_UTIL, 100),
    "DCGM_FI_PROF_SM_ACTIVE": (pynvml.NVML_GPM_METRIC_SM_UTIL, 100),
    "DCGM_FI_PROF_SM_OCCUPANCY": (pynvml.NVML_GPM_METRIC_SM_OCCUPANCY, 100),
    "DCGM_FI_PROF_PIPE_TENSOR_ACTIVE": (pynvml.NVML_GPM_METRIC_ANY_TENSOR_UTIL, 100),
    "DCGM_FI_PROF_DRAM_ACTIVE": (pynvml.NVML_GPM_METRIC_DRAM_BW_UTIL, 100),
    "DCGM_FI_PROF_PIPE_FP64_ACTIVE": (pynvml.NVML_GPM_METRIC_FP64_UTIL, 100),
    "DCGM_FI_PROF_PIPE_FP32_ACTIVE": (pynvml.NVML_GPM_METRIC_FP32_UTIL, 100),
    "DCGM_FI_PROF_PIPE_FP16_ACTIVE": (pynvml.NVML_GPM_METRIC_FP16_UTIL, 100),
    "DCGM_FI_PROF_PCIE_TX_BYTES": (pynvml.NVML_GPM_METRIC_PCIE_TX_PER_SEC, 1 / MIB),
    "DCGM_FI_PROF_PCIE_RX_BYTES": (pynvml.NVML_GPM_METRIC_PCIE_RX_PER_SEC, 1 / MIB),
    "DCGM_FI_PROF_NVLINK_TX_BYTES": (pynvml.NVML_GPM_METRIC_NVLINK_TOTAL_TX_PER_SEC, 1 / MIB),
    "DCGM_FI_PROF_NVLINK_RX_BYTES": (pynvml.NVML_GPM_METRIC_NVLINK_TOTAL_RX_PER_SEC, 1 / MIB),
}


@pytest.fixture
def gpm_fake() -> Iterator[FakeNvmlLib]:
    with installed(eight_gpm_gpus()) as lib:
        yield lib


@pytest.fixture
def plain_fake() -> Iterator[FakeNvmlLib]:
    with installed(eight_gpus()) as lib:
        yield lib


async def page(server: TestServer, path: str, *, until: str = "") -> str:
    """GET ``path``; with ``until``, again until the page contains it (GPM needs two samples for an interval)."""
    deadline = time.monotonic() + 30
    async with ClientSession() as http:
        while True:
            async with http.get(server.make_url(path), headers=AUTH) as resp:
                assert resp.status == 200
                text = await resp.text()
            if until in text or time.monotonic() > deadline:
                return text
            await asyncio.sleep(0.1)


def check_profiling_values(text: str, fake: FakeNvmlLib, **extra: str) -> None:
    for i, gpu in enumerate(fake.gpus):
        labels = {"gpu": str(i), "UUID": gpu.uuid, "device": f"nvidia{i}", **extra}
        for name, (metric, divisor) in EXPECTED.items():
            got = prom_value(text, name, **labels)
            if i == 2 and metric in GPM_NVLINK:
                assert got is None, f"{name}: GPU 2 has no NVLink, so no sample (not 0)"
            else:
                assert got == pytest.approx(gpm_values(i)[metric] / divisor), (name, i)
    for name in EXPECTED:
        assert f"# TYPE {name} gauge\n" in text


async def test_metrics_page_carries_the_profiling_series_and_passes_promtool(
    aiohttp_server: ServerFactory, tmp_path: Path, gpm_fake: FakeNvmlLib
) -> None:
    server = await serve_agent(aiohttp_server, tmp_path)
    text = await page(server, "/metrics", until="DCGM_FI_PROF_PIPE_TENSOR_ACTIVE{")
    promtool_check(text)
    check_profiling_values(text, gpm_fake)
    assert prom_value(text, "rawvm_telemetry_collector_success", collector="gpu_profiling") == 1
    assert prom_value(text, "DCGM_FI_PROF_PIPE_TENSOR_ACTIVE", gpu="5") == 0.4  # 40 % from GPM: DCGM's ratio


async def test_dcgm_page_carries_the_profiling_series(
    aiohttp_server: ServerFactory, tmp_path: Path, gpm_fake: FakeNvmlLib
) -> None:
    server = await serve_agent(aiohttp_server, tmp_path)
    text = await page(server, "/metrics/dcgm", until="DCGM_FI_PROF_PIPE_TENSOR_ACTIVE{")
    check_profiling_values(text, gpm_fake, modelName=gpm_fake.gpus[0].name)
    # The profiling gauges add no promtool finding beyond those of dcgm-exporter's own page.
    assert promtool_findings(text) == DCGM_EXPORTER_FINDINGS


async def test_without_gpm_the_profiling_series_are_absent(
    aiohttp_server: ServerFactory, tmp_path: Path, plain_fake: FakeNvmlLib
) -> None:
    server = await serve_agent(aiohttp_server, tmp_path)
    await asyncio.sleep(0.5)  # a few sampling intervals: time for an interval had GPM been there
    metrics, dcgm = await page(server, "/metrics"), await page(server, "/metrics/dcgm")
    promtool_check(metrics)
    for text in (metrics, dcgm):
        assert "DCGM_FI_DEV_GPU_UTIL{" in text  # the GPUs are there…
        assert "DCGM_FI_PROF_" not in text  # …their profiling series are not, not even as 0
    assert prom_value(metrics, "rawvm_telemetry_collector_success", collector="gpu_profiling") == 1
    assert plain_fake.gpm_samples == {}  # nothing allocated for GPUs that cannot use it


def test_a_failing_gpm_costs_only_its_own_readings(gpm_fake: FakeNvmlLib, tmp_path: Path) -> None:
    sampler = Sampler(TelemetryConfig(interval=0.05), tmp_path)
    try:
        sampler.sample_once()
        assert len(sampler.sample_once()["gpu_profiling"]) == 8

        def broken(*args: Any) -> int:
            raise RuntimeError("driver fell over")

        gpm_fake.nvmlGpmSampleGet = CFunction(broken)  # type: ignore[method-assign]
        pynvml._nvmlGetFunctionPointer_cache.clear()
        sample = sampler.sample_once()
        assert "gpu_profiling" not in sample and "driver fell over" in sample["errors"]["gpu_profiling"]
        assert [g["utilization_gpu_percent"] for g in sample["gpu"]] == [g.util_gpu for g in gpm_fake.gpus]
        text = sampler.render_prometheus()
        assert prom_value(text, "rawvm_telemetry_collector_success", collector="gpu_profiling") == 0
        assert prom_value(text, "rawvm_telemetry_collector_success", collector="gpu") == 1
        assert "DCGM_FI_PROF_" not in text and "DCGM_FI_DEV_GPU_UTIL{" in text
    finally:
        sampler.close()
    assert gpm_fake.gpm_samples == {}  # closed before NVML shut down: every GPM sample freed


def test_a_gpm_error_drops_that_interval_and_recovers(gpm_fake: FakeNvmlLib, tmp_path: Path) -> None:
    sampler = Sampler(TelemetryConfig(interval=0.05), tmp_path)
    try:
        sampler.sample_once()
        real = gpm_fake.nvmlGpmMetricsGet
        gpm_fake.nvmlGpmMetricsGet = CFunction(lambda request: pynvml.NVML_ERROR_GPU_IS_LOST)  # type: ignore[method-assign]
        pynvml._nvmlGetFunctionPointer_cache.clear()
        sample = sampler.sample_once()
        assert sample["gpu_profiling"] == [] and "errors" not in sample  # an NVML answer, not a broken collector
        gpm_fake.nvmlGpmMetricsGet = real  # type: ignore[method-assign]
        pynvml._nvmlGetFunctionPointer_cache.clear()
        entries = sampler.sample_once()["gpu_profiling"]
        assert [e["index"] for e in entries] == list(range(8))
        assert entries[3]["tensor_active_percent"] == gpm_values(3)[pynvml.NVML_GPM_METRIC_ANY_TENSOR_UTIL]
        assert entries[3]["nvlink_transmit_bytes_per_second"] == 2003 * MIB
    finally:
        sampler.close()


def test_a_gpm_allocation_that_fails_halfway_frees_what_it_got(gpm_fake: FakeNvmlLib, tmp_path: Path) -> None:
    real, calls = gpm_fake.nvmlGpmSampleAlloc, []

    def every_other(sample_ref: Any) -> int:
        calls.append(1)
        return int(real(sample_ref)) if len(calls) % 2 else pynvml.NVML_ERROR_MEMORY

    gpm_fake.nvmlGpmSampleAlloc = CFunction(every_other)  # type: ignore[method-assign]
    sampler = Sampler(TelemetryConfig(interval=0.05), tmp_path)
    try:
        assert len(calls) == 16 and gpm_fake.gpm_samples == {}  # each GPU's first sample freed again
        sampler.sample_once()
        sample = sampler.sample_once()
        assert sample["gpu_profiling"] == [] and "errors" not in sample and len(sample["gpu"]) == 8
    finally:
        sampler.close()
