"""GPU telemetry through NVML, with only the C library faked.

``pynvml.nvmlLib`` is replaced by ``FakeNvmlLib`` (test_nvml_fakelib.py), the ecosystem's standard NVML test
boundary: nvidia-ml-py's real wrappers run and read the fake's answers through ctypes ``byref`` references.
Scenario from the issue: 8 GPUs, GPU 3 answers NotSupported for power, GPU 5 raises an XID event; the values
in the samples and in the Prometheus text must be the fake's. Without the library (the real situation on this
machine: no driver) the agent sees 0 GPUs and no error.
"""

from __future__ import annotations

import re
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pynvml
import pytest
from rawvm_agent.config import TelemetryConfig
from rawvm_agent.telemetry import Sampler
from rawvm_agent.telemetry.collectors.gpu import GpuCollector

from tests.agent.test_nvml_fakelib import FakeNvmlLib, eight_gpus, installed


@pytest.fixture
def fake() -> Iterator[FakeNvmlLib]:
    with installed(eight_gpus()) as lib:
        yield lib


@pytest.fixture
def sampler(fake: FakeNvmlLib, tmp_path: Path) -> Iterator[Sampler]:
    s = Sampler(TelemetryConfig(), tmp_path)
    yield s
    s.close()


def prom_value(text: str, metric: str, /, **labels: str) -> float | None:
    """The value of the one sample of ``metric`` whose labels include ``labels``; None if absent."""
    found = []
    for line in text.splitlines():
        if line.startswith("#"):
            continue
        m = re.fullmatch(r"([a-zA-Z_:][a-zA-Z0-9_:]*)(\{.*\})? (\S+)", line)
        assert m, f"unparsable line {line!r}"
        if m.group(1) != metric:
            continue
        got = dict(re.findall(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"', m.group(2) or ""))
        if all(got.get(k) == v for k, v in labels.items()):
            found.append(float(m.group(3)))
    assert len(found) <= 1, f"{metric}{labels} matched {len(found)} samples"
    return found[0] if found else None


def test_eight_gpus_values_match_the_fake_in_samples(fake: FakeNvmlLib, sampler: Sampler) -> None:
    assert sampler.gpu_count == 8
    sample = sampler.sample_once()
    assert "errors" not in sample
    gpus = sample["gpu"]
    assert [g["index"] for g in gpus] == list(range(8))
    for i, (g, f) in enumerate(zip(gpus, fake.gpus, strict=True)):
        assert g["uuid"] == f.uuid and g["name"] == f.name
        assert g["utilization_gpu_percent"] == f.util_gpu
        assert g["utilization_memory_percent"] == f.util_memory
        assert g["memory_used_bytes"] == f.memory_used
        assert g["memory_total_bytes"] == f.memory_total
        assert g["energy_joules"] == f.energy_mj / 1000  # type: ignore[operator]
        assert g["temperature_celsius"] == f.temperature_c
        assert g["sm_clock_hertz"] == f.sm_mhz * 1_000_000
        assert g["memory_clock_hertz"] == f.memory_mhz * 1_000_000
        assert g["clock_event_reasons"] == f.clock_event_reasons
        assert g["ecc_corrected_errors"] == f.ecc_corrected
        assert g["ecc_uncorrected_errors"] == f.ecc_uncorrected
        assert g["processes"] == [{"pid": pid, "used_memory_bytes": used} for pid, used in f.compute_processes]
        if i == 3:
            assert "power_watts" not in g  # NotSupported: that metric absent, the rest fine
        else:
            assert g["power_watts"] == f.power_mw / 1000  # type: ignore[operator]
    # The idle logic's view: max utilization per GPU over the window.
    assert sampler.gpu_utilization(60) == [float(f.util_gpu or 0) for f in fake.gpus]


def test_not_supported_is_asked_once_and_remembered(fake: FakeNvmlLib, sampler: Sampler) -> None:
    for _ in range(3):
        sampler.sample_once()
    # 8 GPUs x 3 samples; GPU 3's NotSupported answer ends its power queries after the first.
    assert fake.calls["nvmlDeviceGetPowerUsage"] == 7 * 3 + 1
    assert fake.calls["nvmlDeviceGetHandleByIndex_v2"] == 8  # handles cached at start


def test_eight_gpus_values_match_the_fake_in_prometheus(fake: FakeNvmlLib, sampler: Sampler) -> None:
    sampler.sample_once()
    text = sampler.render_prometheus()
    assert prom_value(text, "rawvm_gpu_devices") == 8
    for i, f in enumerate(fake.gpus):
        gpu = {"gpu": str(i), "uuid": f.uuid}
        assert prom_value(text, "rawvm_gpu_info", name=f.name, **gpu) == 1
        assert prom_value(text, "rawvm_gpu_utilization_ratio", **gpu) == pytest.approx(f.util_gpu / 100)  # type: ignore[operator]
        assert prom_value(text, "rawvm_gpu_memory_utilization_ratio", **gpu) == pytest.approx(f.util_memory / 100)
        assert prom_value(text, "rawvm_gpu_memory_used_bytes", **gpu) == f.memory_used
        assert prom_value(text, "rawvm_gpu_memory_total_bytes", **gpu) == f.memory_total
        assert prom_value(text, "rawvm_gpu_energy_joules_total", **gpu) == f.energy_mj / 1000  # type: ignore[operator]
        assert prom_value(text, "rawvm_gpu_temperature_celsius", **gpu) == f.temperature_c
        assert prom_value(text, "rawvm_gpu_sm_clock_hertz", **gpu) == f.sm_mhz * 1e6
        assert prom_value(text, "rawvm_gpu_memory_clock_hertz", **gpu) == f.memory_mhz * 1e6
        assert prom_value(text, "rawvm_gpu_ecc_corrected_errors_total", **gpu) == f.ecc_corrected
        assert prom_value(text, "rawvm_gpu_ecc_uncorrected_errors_total", **gpu) == f.ecc_uncorrected
        expected_power = None if i == 3 else f.power_mw / 1000  # type: ignore[operator]
        assert prom_value(text, "rawvm_gpu_power_watts", **gpu) == expected_power
        reasons = f.clock_event_reasons or 0
        assert prom_value(text, "rawvm_gpu_clock_event_reason_active", reason="sw_power_cap", **gpu) == (
            1 if reasons & 0x4 else 0
        )
        assert prom_value(text, "rawvm_gpu_clock_event_reason_active", reason="gpu_idle", **gpu) == (
            1 if reasons & 0x1 else 0
        )
        for pid, used in f.compute_processes:
            assert prom_value(text, "rawvm_gpu_process_memory_used_bytes", pid=str(pid), **gpu) == used


def test_xid_event_reaches_samples_and_prometheus(fake: FakeNvmlLib, tmp_path: Path) -> None:
    s = Sampler(TelemetryConfig(interval=0.05), tmp_path)
    collector = s._gpu
    collector.start_events()
    try:
        assert set(fake.registered) == set(range(8))
        fake.events.put((5, 79))
        deadline = time.monotonic() + 10
        sample = s.sample_once()
        while "xid_errors" not in sample["gpu"][5] and time.monotonic() < deadline:
            time.sleep(0.05)
            sample = s.sample_once()
        assert sample["gpu"][5]["xid_errors"] == {"79": 1}
        assert all("xid_errors" not in g for i, g in enumerate(sample["gpu"]) if i != 5)
        text = s.render_prometheus()
        assert prom_value(text, "rawvm_gpu_xid_errors_total", gpu="5", xid="79") == 1
        assert prom_value(text, "rawvm_gpu_xid_errors_total", gpu="4") is None
    finally:
        s.close()
    assert collector._event_thread is None and fake.initialized == 0  # thread joined, NVML shut down


async def test_sampler_start_stop_runs_and_ends_the_event_thread(fake: FakeNvmlLib, tmp_path: Path) -> None:
    s = Sampler(TelemetryConfig(interval=0.05), tmp_path)
    await s.start()
    thread = s._gpu._event_thread
    assert thread is not None and thread.is_alive()
    fake.events.put((0, 48))
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        latest = s.latest()
        if latest and latest["gpu"][0].get("xid_errors") == {"48": 1}:
            break
        await __import__("asyncio").sleep(0.05)
    else:
        raise AssertionError("the XID never reached a sample")
    await s.stop()
    assert not thread.is_alive()


def test_no_library_means_zero_gpus_and_no_error(tmp_path: Path) -> None:
    """pynvml loaded, no libnvidia-ml.so here: the real nvmlInit raises NVMLError_LibraryNotFound."""
    assert pynvml.nvmlLib is None
    with pytest.raises(pynvml.NVMLError_LibraryNotFound):
        pynvml.nvmlInit()
    collector = GpuCollector()
    assert collector.count == 0 and collector.collect() == []
    s = Sampler(TelemetryConfig(), tmp_path)
    sample = s.sample_once()
    assert s.gpu_count == 0 and sample["gpu"] == [] and "errors" not in sample
    assert s.gpu_utilization(60) == []
    assert "rawvm_gpu_devices 0" in s.render_prometheus()
    s.close()


def test_configured_library_path_that_does_not_exist_means_zero_gpus() -> None:
    assert GpuCollector("/nonexistent/libnvidia-ml.so.1").count == 0


def test_fresh_agent_process_without_nvml_does_not_even_import_pynvml(tmp_path: Path) -> None:
    code = (
        "import sys; from pathlib import Path; from rawvm_agent.config import TelemetryConfig;"
        "from rawvm_agent.telemetry import Sampler;"
        f"s = Sampler(TelemetryConfig(), Path({str(tmp_path)!r})); s.sample_once();"
        "print(s.gpu_count, 'pynvml' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["0", "False"]


class MismatchedDriver(FakeNvmlLib):
    """After a driver upgrade without a reboot, NVML refuses to start: RM/NVML version mismatch."""

    def nvmlInitWithFlags(self, flags: int) -> int:
        return int(pynvml.NVML_ERROR_LIB_RM_VERSION_MISMATCH)


class OneGpuLost(FakeNvmlLib):
    """GPU 2 fell off the bus: NVML answers GPU_IS_LOST for its handle."""

    def nvmlDeviceGetHandleByIndex_v2(self, index: Any, handle_ref: Any) -> int:
        if index.value == 2:
            return int(pynvml.NVML_ERROR_GPU_IS_LOST)
        return super().nvmlDeviceGetHandleByIndex_v2(index, handle_ref)


def sample_once_with(lib: FakeNvmlLib, state_dir: Path) -> tuple[int, dict[str, Any]]:
    """One sample from a Sampler over the fake NVML library: (the Sampler's gpu_count, the sample)."""
    with installed(lib):
        s = Sampler(TelemetryConfig(), state_dir)
        sample = s.sample_once()
        gpu_count = s.gpu_count
        s.close()
    return gpu_count, sample


def test_nvml_that_will_not_start_is_a_gpu_error_not_a_crash(tmp_path: Path) -> None:
    gpu_count, sample = sample_once_with(MismatchedDriver(eight_gpus().gpus), tmp_path)
    assert gpu_count == 0
    assert "gpu" not in sample
    assert "RM has detected an NVML/RM version mismatch" in sample["errors"]["gpu"]
    assert {"cpu", "memory", "disk", "network", "load", "processes"} <= set(sample)


def test_a_lost_gpu_leaves_the_others_reporting(tmp_path: Path) -> None:
    gpu_count, sample = sample_once_with(OneGpuLost(eight_gpus().gpus), tmp_path)
    assert gpu_count == 7
    assert [g["index"] for g in sample["gpu"]] == [0, 1, 3, 4, 5, 6, 7]
    assert sample["gpu"][2]["uuid"].endswith("03") and "errors" not in sample
