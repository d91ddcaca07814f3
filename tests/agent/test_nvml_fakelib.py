"""A fake ``libnvidia-ml.so`` for tests: NVML's C entry points as Python callables.

No NVIDIA driver exists here, so the NVML *C library* is the one boundary we fake, the ecosystem's standard
way: ``pynvml.nvmlLib`` is set to a ``FakeNvmlLib``. nvidia-ml-py's real wrapper code still runs
(``_nvmlGetFunctionPointer`` looks each entry point up with ``getattr(nvmlLib, name)``, the wrappers build
ctypes structures and pass them ``byref``); the fake writes its answers through those references exactly as
the C functions write through their pointer arguments, and returns NVML status codes.

The tests at the bottom check the fake against the real wrappers, so the other NVML tests can trust it.
"""

from __future__ import annotations

import contextlib
import ctypes
import queue
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import pynvml

SUCCESS: int = pynvml.NVML_SUCCESS
NOT_SUPPORTED: int = pynvml.NVML_ERROR_NOT_SUPPORTED
INVALID_ARGUMENT: int = pynvml.NVML_ERROR_INVALID_ARGUMENT
INSUFFICIENT_SIZE: int = pynvml.NVML_ERROR_INSUFFICIENT_SIZE
TIMEOUT: int = pynvml.NVML_ERROR_TIMEOUT
XID: int = pynvml.nvmlEventTypeXidCriticalError
HANDLE_BASE = 0x7F000000
EVENT_SET_ADDRESS = 0x7E000000
GPM_SAMPLE_BASE = 0x7D000000  # where the fake's GPM sample "allocations" live (opaque pointers, never dereferenced)


@dataclass
class FakeGpu:
    """What one GPU answers. ``None`` for a value means the device answers NVML_ERROR_NOT_SUPPORTED."""

    uuid: str
    name: str = "NVIDIA H100 80GB HBM3"
    util_gpu: int | None = 0
    util_memory: int = 0
    memory_total: int = 80 * 1024**3
    memory_used: int = 0
    power_mw: int | None = 70_000
    energy_mj: int | None = 1_000_000
    temperature_c: int | None = 30
    sm_mhz: int = 1980
    memory_mhz: int = 2619
    clock_event_reasons: int | None = 0x1
    ecc_corrected: int | None = 0
    ecc_uncorrected: int | None = 0
    compute_processes: list[tuple[int, int]] = field(default_factory=list)  # (pid, used bytes)
    xid_supported: bool = True
    # NVML GPM (Hopper and later): metric id (pynvml.NVML_GPM_METRIC_*) → the value nvmlGpmMetricsGet reports for
    # any interval; a metric not in the map answers NOT_SUPPORTED in its own slot. None: the device has no GPM
    # (nvmlGpmQueryDeviceSupport says isSupportedDevice 0, as on Ampere and older).
    gpm: dict[int, float] | None = None


@dataclass
class GpmSample:
    """What the fake remembers of one allocated ``nvmlGpmSample_t``: which device filled it, and when."""

    gpu: int | None = None
    taken: int = 0  # increases with every nvmlGpmSampleGet, so two samples have an order


class CFunction:
    """A C entry point: callable, and it accepts ``restype``/``argtypes`` like a ctypes function pointer."""

    def __init__(self, impl: Callable[..., Any]) -> None:
        self.impl = impl
        self.restype: Any = ctypes.c_int
        self.argtypes: Any = None

    def __call__(self, *args: Any) -> Any:
        return self.impl(*args)


def _target(ref: Any) -> Any:
    """The ctypes object a ``byref(...)`` argument points at (what C would dereference)."""
    return ref._obj


def _address(pointer: Any) -> int | None:
    value: int | None = ctypes.cast(pointer, ctypes.c_void_p).value
    return value


def _write_pointer(ref: Any, address: int) -> None:
    """``*out = (void *)address`` for an out-parameter of an opaque handle type."""
    ctypes.cast(ctypes.addressof(_target(ref)), ctypes.POINTER(ctypes.c_void_p))[0] = address


class FakeNvmlLib:
    def __init__(self, gpus: list[FakeGpu]) -> None:
        self.gpus = gpus
        self.events: queue.Queue[tuple[int, int]] = queue.Queue()  # (gpu index, xid) to deliver
        self.registered: dict[int, int] = {}  # gpu index → event mask
        self.calls: dict[str, int] = {}
        self.initialized = 0
        self.gpm_samples: dict[int, GpmSample] = {}  # address → sample; freed ones are removed
        self._gpm_allocated = 0
        self._gpm_clock = 0
        for name in dir(type(self)):
            if name.startswith("nvml"):
                setattr(self, name, CFunction(self._counted(name, getattr(self, name))))

    def _counted(self, name: str, impl: Callable[..., int]) -> Callable[..., Any]:
        def call(*args: Any) -> Any:
            self.calls[name] = self.calls.get(name, 0) + 1
            return impl(*args)

        return call

    def _gpu(self, handle: Any) -> FakeGpu | None:
        index = self._index(handle)
        return None if index is None else self.gpus[index]

    def _index(self, handle: Any) -> int | None:
        offset = (_address(handle) or 0) - HANDLE_BASE
        if offset < 0 or offset % 0x100 or offset // 0x100 >= len(self.gpus):
            return None
        return offset // 0x100

    # -- init, count, handles, identity ---------------------------------------------------------------------

    def nvmlInitWithFlags(self, flags: int) -> int:
        self.initialized += 1
        return SUCCESS

    def nvmlShutdown(self) -> int:
        self.initialized -= 1
        return SUCCESS

    def nvmlErrorString(self, code: int) -> bytes:
        return f"fake NVML error {code}".encode()

    def nvmlDeviceGetCount_v2(self, count_ref: Any) -> int:
        _target(count_ref).value = len(self.gpus)
        return SUCCESS

    def nvmlDeviceGetHandleByIndex_v2(self, index: ctypes.c_uint, handle_ref: Any) -> int:
        if index.value >= len(self.gpus):
            return INVALID_ARGUMENT
        _write_pointer(handle_ref, HANDLE_BASE + 0x100 * index.value)
        return SUCCESS

    def _string(self, handle: Any, buffer: Any, size: ctypes.c_uint, pick: Callable[[FakeGpu], str]) -> int:
        gpu = self._gpu(handle)
        if gpu is None:
            return INVALID_ARGUMENT
        data = pick(gpu).encode()
        if len(data) + 1 > size.value:
            return INSUFFICIENT_SIZE
        buffer.value = data
        return SUCCESS

    def nvmlDeviceGetName(self, handle: Any, buffer: Any, size: ctypes.c_uint) -> int:
        return self._string(handle, buffer, size, lambda g: g.name)

    def nvmlDeviceGetUUID(self, handle: Any, buffer: Any, size: ctypes.c_uint) -> int:
        return self._string(handle, buffer, size, lambda g: g.uuid)

    # -- readings -------------------------------------------------------------------------------------------

    def nvmlDeviceGetUtilizationRates(self, handle: Any, util_ref: Any) -> int:
        gpu = self._gpu(handle)
        if gpu is None:
            return INVALID_ARGUMENT
        if gpu.util_gpu is None:
            return NOT_SUPPORTED
        _target(util_ref).gpu = gpu.util_gpu
        _target(util_ref).memory = gpu.util_memory
        return SUCCESS

    def nvmlDeviceGetMemoryInfo(self, handle: Any, memory_ref: Any) -> int:
        gpu = self._gpu(handle)
        if gpu is None:
            return INVALID_ARGUMENT
        memory = _target(memory_ref)
        memory.total, memory.used, memory.free = gpu.memory_total, gpu.memory_used, gpu.memory_total - gpu.memory_used
        return SUCCESS

    def _scalar(self, handle: Any, out_ref: Any, pick: Callable[[FakeGpu], int | None]) -> int:
        gpu = self._gpu(handle)
        if gpu is None:
            return INVALID_ARGUMENT
        value = pick(gpu)
        if value is None:
            return NOT_SUPPORTED
        _target(out_ref).value = value
        return SUCCESS

    def nvmlDeviceGetPowerUsage(self, handle: Any, out_ref: Any) -> int:
        return self._scalar(handle, out_ref, lambda g: g.power_mw)

    def nvmlDeviceGetTotalEnergyConsumption(self, handle: Any, out_ref: Any) -> int:
        return self._scalar(handle, out_ref, lambda g: g.energy_mj)

    def nvmlDeviceGetTemperature(self, handle: Any, sensor: ctypes.c_uint, out_ref: Any) -> int:
        if sensor.value != pynvml.NVML_TEMPERATURE_GPU:
            return INVALID_ARGUMENT
        return self._scalar(handle, out_ref, lambda g: g.temperature_c)

    def nvmlDeviceGetClockInfo(self, handle: Any, clock: ctypes.c_uint, out_ref: Any) -> int:
        picks = {pynvml.NVML_CLOCK_SM: lambda g: g.sm_mhz, pynvml.NVML_CLOCK_MEM: lambda g: g.memory_mhz}
        if clock.value not in picks:
            return INVALID_ARGUMENT
        return self._scalar(handle, out_ref, picks[clock.value])

    def nvmlDeviceGetCurrentClocksEventReasons(self, handle: Any, out_ref: Any) -> int:
        return self._scalar(handle, out_ref, lambda g: g.clock_event_reasons)

    def nvmlDeviceGetTotalEccErrors(self, handle: Any, error_type: Any, counter: Any, out_ref: Any) -> int:
        if counter.value not in (pynvml.NVML_VOLATILE_ECC, pynvml.NVML_AGGREGATE_ECC):
            return INVALID_ARGUMENT
        if error_type.value == pynvml.NVML_MEMORY_ERROR_TYPE_CORRECTED:
            return self._scalar(handle, out_ref, lambda g: g.ecc_corrected)
        if error_type.value == pynvml.NVML_MEMORY_ERROR_TYPE_UNCORRECTED:
            return self._scalar(handle, out_ref, lambda g: g.ecc_uncorrected)
        return INVALID_ARGUMENT

    def _processes(self, procs: list[tuple[int, int]], count_ref: Any, array: Any) -> int:
        count = _target(count_ref)
        if array is None:  # the sizing call: C reports how many, and SUCCESS only when there are none
            count.value = len(procs)
            return SUCCESS if not procs else INSUFFICIENT_SIZE
        if count.value < len(procs):
            count.value = len(procs)
            return INSUFFICIENT_SIZE
        for i, (pid, used) in enumerate(procs):
            array[i].pid = pid
            array[i].usedGpuMemory = used
            array[i].gpuInstanceId = 0xFFFFFFFF
            array[i].computeInstanceId = 0xFFFFFFFF
        count.value = len(procs)
        return SUCCESS

    def nvmlDeviceGetComputeRunningProcesses_v3(self, handle: Any, count_ref: Any, array: Any) -> int:
        gpu = self._gpu(handle)
        return INVALID_ARGUMENT if gpu is None else self._processes(gpu.compute_processes, count_ref, array)

    def nvmlDeviceGetGraphicsRunningProcesses_v3(self, handle: Any, count_ref: Any, array: Any) -> int:
        return INVALID_ARGUMENT if self._gpu(handle) is None else self._processes([], count_ref, array)

    # -- events ---------------------------------------------------------------------------------------------

    def nvmlEventSetCreate(self, set_ref: Any) -> int:
        _write_pointer(set_ref, EVENT_SET_ADDRESS)
        return SUCCESS

    def nvmlDeviceGetSupportedEventTypes(self, handle: Any, out_ref: Any) -> int:
        return self._scalar(handle, out_ref, lambda g: pynvml.nvmlEventTypeAll if g.xid_supported else 0)

    def nvmlDeviceRegisterEvents(self, handle: Any, mask: ctypes.c_ulonglong, event_set: Any) -> int:
        index = self._index(handle)
        if index is None or _address(event_set) != EVENT_SET_ADDRESS:
            return INVALID_ARGUMENT
        if not self.gpus[index].xid_supported:
            return NOT_SUPPORTED
        self.registered[index] = mask.value
        return SUCCESS

    def nvmlEventSetWait_v2(self, event_set: Any, data_ref: Any, timeout_ms: ctypes.c_uint) -> int:
        if _address(event_set) != EVENT_SET_ADDRESS:
            return INVALID_ARGUMENT
        try:
            index, xid = self.events.get(timeout=timeout_ms.value / 1000)
        except queue.Empty:
            return TIMEOUT
        data = _target(data_ref)
        data.device = ctypes.cast(ctypes.c_void_p(HANDLE_BASE + 0x100 * index), pynvml.c_nvmlDevice_t)
        data.eventType = XID
        data.eventData = xid
        return SUCCESS

    def nvmlEventSetFree(self, event_set: Any) -> int:
        return SUCCESS if _address(event_set) == EVENT_SET_ADDRESS else INVALID_ARGUMENT

    # -- GPM (GPU performance monitoring) ---------------------------------------------------------------------
    # NVML's contract (nvml.h): a caller allocates two samples, fills each with nvmlGpmSampleGet on one device,
    # and nvmlGpmMetricsGet computes each requested metric over the interval between them, writing a value and a
    # status per metric slot; the call itself fails only when the request is malformed.

    def nvmlGpmQueryDeviceSupport(self, handle: Any, support_ref: Any) -> int:
        gpu = self._gpu(handle)
        support = _target(support_ref)
        if gpu is None or support.version != pynvml.NVML_GPM_SUPPORT_VERSION:
            return INVALID_ARGUMENT
        support.isSupportedDevice = int(gpu.gpm is not None)
        return SUCCESS

    def nvmlGpmSampleAlloc(self, sample_ref: Any) -> int:
        self._gpm_allocated += 1
        address = GPM_SAMPLE_BASE + 0x100 * self._gpm_allocated
        self.gpm_samples[address] = GpmSample()
        _write_pointer(sample_ref, address)
        return SUCCESS

    def nvmlGpmSampleFree(self, sample: Any) -> int:
        return SUCCESS if self.gpm_samples.pop(_address(sample) or 0, None) is not None else INVALID_ARGUMENT

    def nvmlGpmSampleGet(self, handle: Any, sample: Any) -> int:
        index, slot = self._index(handle), self.gpm_samples.get(_address(sample) or 0)
        if index is None or slot is None:
            return INVALID_ARGUMENT
        if self.gpus[index].gpm is None:
            return NOT_SUPPORTED
        self._gpm_clock += 1
        slot.gpu, slot.taken = index, self._gpm_clock
        return SUCCESS

    def nvmlGpmMetricsGet(self, request_ref: Any) -> int:
        request = _target(request_ref)
        first = self.gpm_samples.get(_address(request.sample1) or 0)
        second = self.gpm_samples.get(_address(request.sample2) or 0)
        if (
            request.version != pynvml.NVML_GPM_METRICS_GET_VERSION
            or first is None
            or second is None
            or first.gpu is None
            or first.gpu != second.gpu
            or first.taken >= second.taken  # an interval runs from the older sample to the newer one
            or not 0 < request.numMetrics <= pynvml.NVML_GPM_METRIC_MAX
        ):
            return INVALID_ARGUMENT
        values = self.gpus[first.gpu].gpm or {}
        for i in range(request.numMetrics):
            slot = request.metrics[i]
            if slot.metricId in values:
                slot.value, slot.nvmlReturn = values[slot.metricId], SUCCESS
            else:
                slot.value, slot.nvmlReturn = 0.0, NOT_SUPPORTED
        return SUCCESS


@contextlib.contextmanager
def installed(lib: Any) -> Iterator[Any]:
    """Make ``lib`` pynvml's loaded library for the duration; restore the module's state afterwards."""
    saved = pynvml.nvmlLib, pynvml._nvmlLib_refcount
    pynvml._nvmlGetFunctionPointer_cache.clear()
    pynvml.nvmlLib = lib
    try:
        yield lib
    finally:
        pynvml.nvmlLib, pynvml._nvmlLib_refcount = saved
        pynvml._nvmlGetFunctionPointer_cache.clear()


def eight_gpus() -> FakeNvmlLib:
    """The issue's scenario: 8 GPUs, GPU 3 answers NotSupported for power; tests push an XID on GPU 5."""
    gpus = [
        FakeGpu(
            uuid=f"GPU-00000000-0000-0000-0000-00000000000{i}",
            util_gpu=10 * i + 5,
            util_memory=3 * i,
            memory_used=(i + 1) * 1024**3,
            power_mw=100_000 + 1_500 * i,
            energy_mj=5_000_000 + 250 * i,
            temperature_c=40 + i,
            sm_mhz=1400 + 10 * i,
            memory_mhz=2600 + i,
            clock_event_reasons=0x4 if i == 2 else 0x1,
            ecc_corrected=i,
            ecc_uncorrected=1 if i == 6 else 0,
            compute_processes=[(4000 + i, 512 * 1024**2 * (i + 1))] if i % 2 == 0 else [],
        )
        for i in range(8)
    ]
    gpus[3].power_mw = None
    return FakeNvmlLib(gpus)


GPM_NVLINK = (pynvml.NVML_GPM_METRIC_NVLINK_TOTAL_RX_PER_SEC, pynvml.NVML_GPM_METRIC_NVLINK_TOTAL_TX_PER_SEC)


def gpm_values(i: int) -> dict[int, float]:
    """GPU ``i``'s GPM readings: percentages 0-100 and MiB/s, as NVML reports them; distinct per GPU and metric."""
    return {
        pynvml.NVML_GPM_METRIC_GRAPHICS_UTIL: 50.0 + i,
        pynvml.NVML_GPM_METRIC_SM_UTIL: 40.0 + i,
        pynvml.NVML_GPM_METRIC_SM_OCCUPANCY: 20.5 + i,
        pynvml.NVML_GPM_METRIC_ANY_TENSOR_UTIL: 30.0 + 2 * i,
        pynvml.NVML_GPM_METRIC_DRAM_BW_UTIL: 60.25 + i,
        pynvml.NVML_GPM_METRIC_FP64_UTIL: 0.5 * i,
        pynvml.NVML_GPM_METRIC_FP32_UTIL: 10.0 + i,
        pynvml.NVML_GPM_METRIC_FP16_UTIL: 5.0 + i,
        pynvml.NVML_GPM_METRIC_PCIE_TX_PER_SEC: 100.0 + i,
        pynvml.NVML_GPM_METRIC_PCIE_RX_PER_SEC: 200.0 + i,
        pynvml.NVML_GPM_METRIC_NVLINK_TOTAL_RX_PER_SEC: 1000.0 + i,
        pynvml.NVML_GPM_METRIC_NVLINK_TOTAL_TX_PER_SEC: 2000.0 + i,
    }


def eight_gpm_gpus() -> FakeNvmlLib:
    """``eight_gpus`` on a Hopper-class machine: every GPU answers GPM; GPU 2 has no NVLink (those metrics
    answer NOT_SUPPORTED in their own slots, the rest of its metrics still come)."""
    lib = eight_gpus()
    for i, gpu in enumerate(lib.gpus):
        gpu.gpm = {k: v for k, v in gpm_values(i).items() if i != 2 or k not in GPM_NVLINK}
    return lib


# -- the fake against the real wrappers ---------------------------------------------------------------------


def test_real_wrappers_read_the_fake_through_ctypes_references() -> None:
    with installed(eight_gpus()):
        pynvml.nvmlInit()
        assert pynvml.nvmlDeviceGetCount() == 8
        handle = pynvml.nvmlDeviceGetHandleByIndex(2)
        assert isinstance(handle, pynvml.c_nvmlDevice_t)
        assert pynvml.nvmlDeviceGetUUID(handle) == "GPU-00000000-0000-0000-0000-000000000002"
        assert pynvml.nvmlDeviceGetUtilizationRates(handle).gpu == 25
        assert pynvml.nvmlDeviceGetMemoryInfo(handle).used == 3 * 1024**3
        procs = pynvml.nvmlDeviceGetComputeRunningProcesses(handle)
        assert [(p.pid, p.usedGpuMemory) for p in procs] == [(4002, 3 * 512 * 1024**2)]
        assert pynvml.nvmlDeviceGetComputeRunningProcesses(pynvml.nvmlDeviceGetHandleByIndex(1)) == []
        pynvml.nvmlShutdown()


def test_fake_answers_not_supported_as_the_real_library_would() -> None:
    with installed(eight_gpus()):
        pynvml.nvmlInit()
        handle = pynvml.nvmlDeviceGetHandleByIndex(3)
        try:
            pynvml.nvmlDeviceGetPowerUsage(handle)
        except pynvml.NVMLError_NotSupported as exc:
            assert str(exc) == "Not Supported"
        else:
            raise AssertionError("GPU 3 must answer NotSupported for power")
        assert pynvml.nvmlDeviceGetPowerUsage(pynvml.nvmlDeviceGetHandleByIndex(4)) == 106_000


def test_fake_event_wait_times_out_then_delivers_an_xid() -> None:
    lib = eight_gpus()
    with installed(lib):
        pynvml.nvmlInit()
        event_set = pynvml.nvmlEventSetCreate()
        handle = pynvml.nvmlDeviceGetHandleByIndex(5)
        pynvml.nvmlDeviceRegisterEvents(handle, XID, event_set)
        try:
            pynvml.nvmlEventSetWait(event_set, 10)
        except pynvml.NVMLError_Timeout:
            pass
        else:
            raise AssertionError("an empty event queue must time out")
        lib.events.put((5, 79))
        data = pynvml.nvmlEventSetWait(event_set, 1000)
        assert (data.eventType, data.eventData) == (XID, 79)
        assert _address(data.device) == _address(handle)
        pynvml.nvmlEventSetFree(event_set)


def test_real_gpm_wrappers_read_the_fake() -> None:
    lib = eight_gpm_gpus()
    with installed(lib):
        pynvml.nvmlInit()
        handle = pynvml.nvmlDeviceGetHandleByIndex(2)
        assert pynvml.nvmlGpmQueryDeviceSupport(handle).isSupportedDevice == 1
        older, newer = pynvml.nvmlGpmSampleAlloc(), pynvml.nvmlGpmSampleAlloc()
        pynvml.nvmlGpmSampleGet(handle, older)
        pynvml.nvmlGpmSampleGet(handle, newer)
        request = pynvml.c_nvmlGpmMetricsGet_t()
        request.version = pynvml.NVML_GPM_METRICS_GET_VERSION
        request.numMetrics = 2
        request.sample1, request.sample2 = older, newer
        request.metrics[0].metricId = pynvml.NVML_GPM_METRIC_ANY_TENSOR_UTIL
        request.metrics[1].metricId = pynvml.NVML_GPM_METRIC_NVLINK_TOTAL_TX_PER_SEC
        pynvml.nvmlGpmMetricsGet(request)
        assert (request.metrics[0].nvmlReturn, request.metrics[0].value) == (SUCCESS, 34.0)
        assert request.metrics[1].nvmlReturn == NOT_SUPPORTED  # GPU 2 has no NVLink
        request.sample1, request.sample2 = newer, older  # backwards: a malformed request fails as a whole
        try:
            pynvml.nvmlGpmMetricsGet(request)
        except pynvml.NVMLError_InvalidArgument:
            pass
        else:
            raise AssertionError("an interval from the newer sample to the older one must be refused")
        pynvml.nvmlGpmSampleFree(older)
        pynvml.nvmlGpmSampleFree(newer)
        assert lib.gpm_samples == {}
        pynvml.nvmlShutdown()


def test_fake_without_gpm_says_so() -> None:
    with installed(eight_gpus()):
        pynvml.nvmlInit()
        handle = pynvml.nvmlDeviceGetHandleByIndex(0)
        assert pynvml.nvmlGpmQueryDeviceSupport(handle).isSupportedDevice == 0
        sample = pynvml.nvmlGpmSampleAlloc()
        try:
            pynvml.nvmlGpmSampleGet(handle, sample)
        except pynvml.NVMLError_NotSupported:
            pass
        else:
            raise AssertionError("a device without GPM must refuse a GPM sample")
        pynvml.nvmlGpmSampleFree(sample)
        pynvml.nvmlShutdown()
