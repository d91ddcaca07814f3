"""GPUs through NVML (nvidia-ml-py, ``import pynvml``): one entry per device per sample.

Handles, names and UUIDs are read once. A metric a device answers NotSupported (or an older driver lacks,
FunctionNotFound) is remembered and never asked again: that key is simply absent. No NVML library means
0 GPUs and no error. XID errors arrive as NVML events, waited for in a thread of their own.
"""

from __future__ import annotations

import ctypes
import logging
import socket
import sys
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import partial
from typing import Any

from rawvm_agent.telemetry import dcgm
from rawvm_agent.telemetry.prometheus import family

log = logging.getLogger("rawvm_agent.telemetry.gpu")

DEFAULT_LIBRARY = "libnvidia-ml.so.1"
EVENT_WAIT_MS = 500  # how long one event wait blocks; bounds how long stopping takes

# NVML clock-event (throttle) reason bits → label values.
CLOCK_EVENT_REASONS = {
    0x1: "gpu_idle",
    0x2: "applications_clocks_setting",
    0x4: "sw_power_cap",
    0x8: "hw_slowdown",
    0x10: "sync_boost",
    0x20: "sw_thermal_slowdown",
    0x40: "hw_thermal_slowdown",
    0x80: "hw_power_brake_slowdown",
    0x100: "display_clock_setting",
}


@dataclass
class _Device:
    index: int
    handle: Any
    address: int | None  # the handle's pointer value: how an event names its device
    uuid: str
    name: str
    unsupported: set[str] = field(default_factory=set)


def _address(handle: Any) -> int | None:
    value: int | None = ctypes.cast(handle, ctypes.c_void_p).value
    return value


def _library_loadable(path: str) -> bool:
    try:
        ctypes.CDLL(path)
    except OSError:
        return False
    return True


class GpuCollector:
    name = "gpu"

    def __init__(self, library: str = "", *, open_nvml: bool = True) -> None:
        self._nvml: Any = None
        self._devices: list[_Device] = []
        self._xid_lock = threading.Lock()
        self._xid_counts: dict[tuple[int, int], int] = {}  # (gpu index, xid) → events seen
        self._xid_last: dict[int, int] = {}  # gpu index → the latest XID code (DCGM_FI_DEV_XID_ERRORS)
        self.hostname = socket.gethostname()  # dcgm-exporter's Hostname label
        self._stop_events = threading.Event()
        self._event_thread: threading.Thread | None = None
        self._event_set: Any = None
        self.init_error = ""  # NVML is there but would not start: reported as this collector's error
        if open_nvml:
            self._open(library)

    @classmethod
    def none(cls) -> GpuCollector:
        """A collector that sees no GPUs (stands in when the real one could not even be built)."""
        return cls(open_nvml=False)

    @property
    def count(self) -> int:
        return len(self._devices)

    @property
    def nvml(self) -> Any:
        """The started ``pynvml`` module, None without NVML: shared with the GPM collector (one nvmlInit)."""
        return self._nvml

    def handles(self) -> list[tuple[int, str, str, Any]]:
        """``(index, uuid, name, NVML handle)`` per GPU, for collectors that read the same GPUs another way."""
        return [(d.index, d.uuid, d.name, d.handle) for d in self._devices]

    def _open(self, library: str) -> None:
        # Importing pynvml costs several MB; skip it on machines with no NVML library at all.
        if "pynvml" not in sys.modules and not _library_loadable(library or DEFAULT_LIBRARY):
            log.info("no NVML library: 0 GPUs")
            return
        import pynvml

        try:
            if library and pynvml.nvmlLib is None:
                pynvml.nvmlLib = ctypes.CDLL(library)
            pynvml.nvmlInit()
        except (pynvml.NVMLError_LibraryNotFound, pynvml.NVMLError_DriverNotLoaded, OSError) as exc:
            log.info("NVML unavailable (%s): 0 GPUs", exc)
            return
        except pynvml.NVMLError as exc:
            # A driver/library mismatch after an upgrade, no permission…: GPUs may exist, so say so in every sample.
            self.init_error = f"nvmlInit: {exc}"
            log.warning("NVML: %s", self.init_error)
            return
        self._nvml = pynvml
        try:
            count = pynvml.nvmlDeviceGetCount()
        except pynvml.NVMLError as exc:
            self.init_error = f"nvmlDeviceGetCount: {exc}"
            log.warning("NVML: %s", self.init_error)
            return
        for index in range(count):
            try:
                handle = pynvml.nvmlDeviceGetHandleByIndex(index)
            except pynvml.NVMLError as exc:
                # e.g. GPU_IS_LOST: the other GPUs still report; this one is named in the log.
                log.warning("NVML: GPU %d has no handle: %s", index, exc)
                continue
            self._devices.append(
                _Device(
                    index=index,
                    handle=handle,
                    address=_address(handle),
                    uuid=self._static(pynvml.nvmlDeviceGetUUID, handle),
                    name=self._static(pynvml.nvmlDeviceGetName, handle),
                )
            )
        log.info("NVML: %d GPU(s)", len(self._devices))

    def _static(self, getter: Callable[[Any], Any], handle: Any) -> str:
        try:
            value = getter(handle)
        except self._nvml.NVMLError:
            return ""
        return value.decode() if isinstance(value, bytes) else str(value)

    # -- sampling ---------------------------------------------------------------------------------------------

    def collect(self) -> list[dict[str, Any]]:
        if self.init_error:
            raise RuntimeError(self.init_error)
        return [self._read_device(device) for device in self._devices]

    def _ask(self, device: _Device, key: str, call: Callable[[], Any]) -> Any:
        """One NVML query; None when the device lacks it (remembered) or it failed this time."""
        if key in device.unsupported:
            return None
        nvml = self._nvml
        try:
            return call()
        except (nvml.NVMLError_NotSupported, nvml.NVMLError_FunctionNotFound):
            device.unsupported.add(key)
        except nvml.NVMLError as exc:
            log.debug("GPU %d: %s failed: %s", device.index, key, exc)
        return None

    def _read_device(self, device: _Device) -> dict[str, Any]:
        nvml, handle = self._nvml, device.handle
        out: dict[str, Any] = {"index": device.index, "uuid": device.uuid, "name": device.name}
        util = self._ask(device, "utilization", lambda: nvml.nvmlDeviceGetUtilizationRates(handle))
        if util is not None:
            out["utilization_gpu_percent"] = util.gpu
            out["utilization_memory_percent"] = util.memory
        memory = self._ask(device, "memory", lambda: nvml.nvmlDeviceGetMemoryInfo(handle))
        if memory is not None:
            out["memory_used_bytes"] = memory.used
            out["memory_total_bytes"] = memory.total
        milliwatts = self._ask(device, "power", lambda: nvml.nvmlDeviceGetPowerUsage(handle))
        if milliwatts is not None:
            out["power_watts"] = milliwatts / 1000.0
        millijoules = self._ask(device, "energy", lambda: nvml.nvmlDeviceGetTotalEnergyConsumption(handle))
        if millijoules is not None:
            out["energy_joules"] = millijoules / 1000.0
        celsius = self._ask(
            device, "temperature", lambda: nvml.nvmlDeviceGetTemperature(handle, nvml.NVML_TEMPERATURE_GPU)
        )
        if celsius is not None:
            out["temperature_celsius"] = celsius
        sm_mhz = self._ask(device, "sm_clock", lambda: nvml.nvmlDeviceGetClockInfo(handle, nvml.NVML_CLOCK_SM))
        if sm_mhz is not None:
            out["sm_clock_hertz"] = sm_mhz * 1_000_000
        mem_mhz = self._ask(device, "memory_clock", lambda: nvml.nvmlDeviceGetClockInfo(handle, nvml.NVML_CLOCK_MEM))
        if mem_mhz is not None:
            out["memory_clock_hertz"] = mem_mhz * 1_000_000
        # nvidia-ml-py 12.535 renamed "throttle reasons" to "clock event reasons"; older wrappers have the old name.
        reasons_fn = getattr(nvml, "nvmlDeviceGetCurrentClocksEventReasons", None)
        reasons_fn = reasons_fn or nvml.nvmlDeviceGetCurrentClocksThrottleReasons
        reasons = self._ask(device, "clock_event_reasons", lambda: reasons_fn(handle))
        if reasons is not None:
            out["clock_event_reasons"] = reasons
        for kind, error_type in (
            ("corrected", nvml.NVML_MEMORY_ERROR_TYPE_CORRECTED),
            ("uncorrected", nvml.NVML_MEMORY_ERROR_TYPE_UNCORRECTED),
        ):
            count = self._ask(
                device,
                f"ecc_{kind}",
                partial(nvml.nvmlDeviceGetTotalEccErrors, handle, error_type, nvml.NVML_AGGREGATE_ECC),
            )
            if count is not None:
                out[f"ecc_{kind}_errors"] = count
        processes = self._processes(device)
        if processes is not None:
            out["processes"] = processes
        with self._xid_lock:
            xids = {str(xid): n for (index, xid), n in self._xid_counts.items() if index == device.index}
            last_xid = self._xid_last.get(device.index)
        if xids:
            out["xid_errors"] = xids
        if last_xid is not None:
            out["xid_last"] = last_xid
        return out

    def _processes(self, device: _Device) -> list[dict[str, int]] | None:
        nvml, handle = self._nvml, device.handle
        used: dict[int, int] = {}
        answered = False
        for key, getter in (
            ("compute_processes", nvml.nvmlDeviceGetComputeRunningProcesses),
            ("graphics_processes", nvml.nvmlDeviceGetGraphicsRunningProcesses),
        ):
            procs = self._ask(device, key, partial(getter, handle))
            if procs is None:
                continue
            answered = True
            for proc in procs:
                # A process in both lists is one process: keep its larger figure. None: not available (WDDM).
                used[proc.pid] = max(used.get(proc.pid, 0), proc.usedGpuMemory or 0)
        if not answered:
            return None
        return [{"pid": pid, "used_memory_bytes": used[pid]} for pid in sorted(used)]

    # -- XID events -------------------------------------------------------------------------------------------

    def start_events(self) -> None:
        """Register every device that supports it for XID events and wait for them in a daemon thread."""
        if not self._devices or self._event_thread is not None:
            return
        nvml = self._nvml
        try:
            event_set = nvml.nvmlEventSetCreate()
        except nvml.NVMLError as exc:
            log.warning("NVML events unavailable: %s", exc)
            return
        registered = 0
        for device in self._devices:
            try:
                if nvml.nvmlDeviceGetSupportedEventTypes(device.handle) & nvml.nvmlEventTypeXidCriticalError:
                    nvml.nvmlDeviceRegisterEvents(device.handle, nvml.nvmlEventTypeXidCriticalError, event_set)
                    registered += 1
            except nvml.NVMLError as exc:
                log.debug("GPU %d: no XID events: %s", device.index, exc)
        if not registered:
            nvml.nvmlEventSetFree(event_set)
            return
        self._event_set = event_set
        self._stop_events.clear()
        self._event_thread = threading.Thread(target=self._wait_events, name="rawvm-nvml-events", daemon=True)
        self._event_thread.start()

    def _wait_events(self) -> None:
        nvml = self._nvml
        by_address = {d.address: d.index for d in self._devices}
        while not self._stop_events.is_set():
            try:
                data = nvml.nvmlEventSetWait(self._event_set, EVENT_WAIT_MS)
            except nvml.NVMLError_Timeout:
                continue
            except nvml.NVMLError as exc:
                log.warning("NVML event wait failed: %s", exc)
                self._stop_events.wait(1.0)  # do not spin on a persistent error
                continue
            if not data.eventType & nvml.nvmlEventTypeXidCriticalError:
                continue
            index = by_address.get(_address(data.device), -1)
            xid = int(data.eventData)
            log.warning("GPU %d: XID %d", index, xid)
            with self._xid_lock:
                self._xid_counts[(index, xid)] = self._xid_counts.get((index, xid), 0) + 1
                self._xid_last[index] = xid

    def stop_events(self) -> None:
        """Stop the event thread (within one wait period) and free the event set. Blocks: call from a thread."""
        thread, self._event_thread = self._event_thread, None
        if thread is None:
            return
        self._stop_events.set()
        thread.join()
        try:
            self._nvml.nvmlEventSetFree(self._event_set)
        except self._nvml.NVMLError as exc:
            log.debug("nvmlEventSetFree: %s", exc)
        self._event_set = None

    def close(self) -> None:
        self.stop_events()
        if self._nvml is not None:
            try:
                self._nvml.nvmlShutdown()
            except self._nvml.NVMLError as exc:
                log.debug("nvmlShutdown: %s", exc)
            self._nvml = None
            self._devices = []

    # -- Prometheus -------------------------------------------------------------------------------------------

    def metrics(self, value: list[dict[str, Any]]) -> Iterator[str]:
        yield family("rawvm_gpu_devices", "gauge", "Number of GPUs NVML reports.", [({}, len(value))])

        def per_gpu(key: str, divisor: int) -> list[tuple[dict[str, str], float]]:
            return [
                ({"gpu": str(g["index"]), "uuid": g["uuid"]}, g[key] / divisor if divisor != 1 else g[key])
                for g in value
                if key in g
            ]

        yield family(
            "rawvm_gpu_info",
            "gauge",
            "GPU identity; always 1.",
            [({"gpu": str(g["index"]), "uuid": g["uuid"], "name": g["name"]}, 1) for g in value],
        )
        for key, name, type, help, divisor in (
            ("utilization_gpu_percent", "rawvm_gpu_utilization_ratio", "gauge", "GPU busy share (0-1).", 100),
            (
                "utilization_memory_percent",
                "rawvm_gpu_memory_utilization_ratio",
                "gauge",
                "Share of time GPU memory was read or written (0-1).",
                100,
            ),
            ("memory_used_bytes", "rawvm_gpu_memory_used_bytes", "gauge", "GPU memory used, in bytes.", 1),
            ("memory_total_bytes", "rawvm_gpu_memory_total_bytes", "gauge", "GPU memory size, in bytes.", 1),
            ("power_watts", "rawvm_gpu_power_watts", "gauge", "GPU power draw, in watts.", 1),
            (
                "energy_joules",
                "rawvm_gpu_energy_joules_total",
                "counter",
                "Energy the GPU used since the driver loaded, in joules.",
                1,
            ),
            ("temperature_celsius", "rawvm_gpu_temperature_celsius", "gauge", "GPU temperature, in °C.", 1),
            ("sm_clock_hertz", "rawvm_gpu_sm_clock_hertz", "gauge", "SM clock, in hertz.", 1),
            ("memory_clock_hertz", "rawvm_gpu_memory_clock_hertz", "gauge", "Memory clock, in hertz.", 1),
            (
                "ecc_corrected_errors",
                "rawvm_gpu_ecc_corrected_errors_total",
                "counter",
                "Corrected ECC memory errors over the GPU's life.",
                1,
            ),
            (
                "ecc_uncorrected_errors",
                "rawvm_gpu_ecc_uncorrected_errors_total",
                "counter",
                "Uncorrected ECC memory errors over the GPU's life.",
                1,
            ),
        ):
            yield family(name, type, help, per_gpu(key, divisor))
        yield family(
            "rawvm_gpu_clock_event_reason_active",
            "gauge",
            "1 while this reason holds the GPU's clocks down (NVML clock-event / throttle reasons).",
            [
                (
                    {"gpu": str(g["index"]), "uuid": g["uuid"], "reason": reason},
                    1 if g["clock_event_reasons"] & bit else 0,
                )
                for g in value
                if "clock_event_reasons" in g
                for bit, reason in CLOCK_EVENT_REASONS.items()
            ],
        )
        yield family(
            "rawvm_gpu_xid_errors_total",
            "counter",
            "XID critical error events seen since the agent started, by XID code.",
            [
                ({"gpu": str(g["index"]), "uuid": g["uuid"], "xid": xid}, n)
                for g in value
                for xid, n in g.get("xid_errors", {}).items()
            ],
        )
        yield family(
            "rawvm_gpu_process_memory_used_bytes",
            "gauge",
            "GPU memory used by each process, in bytes.",
            [
                ({"gpu": str(g["index"]), "uuid": g["uuid"], "pid": str(p["pid"])}, p["used_memory_bytes"])
                for g in value
                for p in g.get("processes", [])
            ],
        )
        yield from dcgm.families(value, self.hostname)

    def dcgm_metrics(self, value: list[dict[str, Any]]) -> Iterator[str]:
        """dcgm-exporter's page for these readings: its full label set and types (``/metrics/dcgm``)."""
        return dcgm.families(value, self.hostname, exact=True)
