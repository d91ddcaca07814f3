"""dcgm-exporter's names on the agent's /metrics (and its exact page at /metrics/dcgm), 8 fake GPUs.

NVML's C library is faked as in test_nvml.py (``pynvml.nvmlLib`` replaced, the real nvidia-ml-py wrappers
running); the real agent app serves the pages and the real ``promtool`` checks them. Units are dcgm-exporter's
(etc/default-counters.csv): MiB, MHz, W, mJ, %; XID_ERRORS is the last XID code.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import ClientSession
from rawvm_agent.config import TelemetryConfig
from rawvm_agent.telemetry import Sampler

from tests.agent.test_metrics_prometheus import AUTH, ServerFactory, get_metrics, promtool_check, serve_agent
from tests.agent.test_nvml import prom_value
from tests.agent.test_nvml_fakelib import FakeNvmlLib, eight_gpus, installed
from tests.helpers.promtool import DCGM_EXPORTER_FINDINGS, promtool_findings

MIB = 1 << 20
DCGM_NAMES = (
    "DCGM_FI_DEV_GPU_UTIL",
    "DCGM_FI_DEV_MEM_COPY_UTIL",
    "DCGM_FI_DEV_FB_USED",
    "DCGM_FI_DEV_FB_FREE",
    "DCGM_FI_DEV_POWER_USAGE",
    "DCGM_FI_DEV_GPU_TEMP",
    "DCGM_FI_DEV_SM_CLOCK",
    "DCGM_FI_DEV_MEM_CLOCK",
    "DCGM_FI_DEV_XID_ERRORS",
    "DCGM_FI_DEV_CLOCK_THROTTLE_REASONS",
)


@pytest.fixture
def fake() -> Iterator[FakeNvmlLib]:
    with installed(eight_gpus()) as lib:
        yield lib


def check_values(text: str, fake: FakeNvmlLib, **extra: str) -> None:
    host = socket.gethostname()
    for i, f in enumerate(fake.gpus):
        lbl = {"gpu": str(i), "UUID": f.uuid, "device": f"nvidia{i}", "Hostname": host, **extra}
        assert prom_value(text, "DCGM_FI_DEV_GPU_UTIL", **lbl) == f.util_gpu
        assert prom_value(text, "DCGM_FI_DEV_MEM_COPY_UTIL", **lbl) == f.util_memory
        assert prom_value(text, "DCGM_FI_DEV_FB_USED", **lbl) == f.memory_used // MIB
        assert prom_value(text, "DCGM_FI_DEV_FB_FREE", **lbl) == (f.memory_total - f.memory_used) // MIB
        power = None if f.power_mw is None else f.power_mw / 1000  # GPU 3 answers NotSupported: no sample
        assert prom_value(text, "DCGM_FI_DEV_POWER_USAGE", **lbl) == power
        assert prom_value(text, "DCGM_FI_DEV_GPU_TEMP", **lbl) == f.temperature_c
        assert prom_value(text, "DCGM_FI_DEV_SM_CLOCK", **lbl) == f.sm_mhz
        assert prom_value(text, "DCGM_FI_DEV_MEM_CLOCK", **lbl) == f.memory_mhz
        assert prom_value(text, "DCGM_FI_DEV_CLOCK_THROTTLE_REASONS", **lbl) == f.clock_event_reasons
        assert prom_value(text, "DCGM_FI_DEV_XID_ERRORS", **lbl) == 0


async def test_metrics_page_has_dcgm_names_and_passes_promtool(
    aiohttp_server: ServerFactory, tmp_path: Path, fake: FakeNvmlLib
) -> None:
    server = await serve_agent(aiohttp_server, tmp_path)
    text = await get_metrics(server)
    promtool_check(text)  # the whole page, DCGM families included, is lint-clean (exit code 0)
    for name in DCGM_NAMES:
        assert f"# TYPE {name} gauge\n" in text
    check_values(text, fake)
    assert "modelName=" not in text  # promlint refuses that camelCase label: it is on /metrics/dcgm only


async def test_dcgm_page_is_dcgm_exporters_label_set(
    aiohttp_server: ServerFactory, tmp_path: Path, fake: FakeNvmlLib
) -> None:
    server = await serve_agent(aiohttp_server, tmp_path)
    async with ClientSession() as http:
        async with http.get(server.make_url("/metrics/dcgm")) as resp:
            assert resp.status == 401  # the bearer token, as on /metrics
        async with http.get(server.make_url("/metrics/dcgm"), headers=AUTH) as resp:
            assert resp.status == 200
            text = await resp.text()
    check_values(text, fake, modelName=fake.gpus[0].name)
    assert "# TYPE DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION counter\n" in text
    for i, f in enumerate(fake.gpus):
        assert prom_value(text, "DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION", gpu=str(i)) == f.energy_mj
    assert "rawvm_" not in text
    # promtool parses it; its findings are exactly those dcgm-exporter's own page gets.
    assert promtool_findings(text) == DCGM_EXPORTER_FINDINGS


def test_xid_errors_is_the_last_xid_code(fake: FakeNvmlLib, tmp_path: Path) -> None:
    sampler = Sampler(TelemetryConfig(interval=0.05), tmp_path)
    sampler._gpu.start_events()
    try:
        for xid in (48, 79):
            fake.events.put((5, xid))
        deadline = time.monotonic() + 10
        sample: dict[str, Any] = sampler.sample_once()
        while sample["gpu"][5].get("xid_last") != 79 and time.monotonic() < deadline:
            time.sleep(0.05)
            sample = sampler.sample_once()
        text = sampler.render_prometheus()
        assert prom_value(text, "DCGM_FI_DEV_XID_ERRORS", gpu="5") == 79
        assert prom_value(text, "DCGM_FI_DEV_XID_ERRORS", gpu="4") == 0
        assert sample["gpu"][5]["xid_errors"] == {"48": 1, "79": 1}
    finally:
        sampler.close()
