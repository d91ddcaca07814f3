"""A telemetry sample: ``{"seq": int, "t": unix seconds, <collector name>: value, …, "errors": {…}}``.

``seq`` increases by one per sample and keeps increasing across agent restarts; ``errors`` (present only when
some collector failed) maps that collector's name to its error, and the failing collector's key is absent.
Samples travel and rest as msgpack maps (one frame each, self-delimiting, so frames simply concatenate).

Fields (units in the key names; counters are totals since boot, rates are the reader's job):

- ``cpu``: ``percent`` (all cores, busy share of the last interval), ``per_core_percent`` (list),
  ``seconds`` (mode → seconds, all cores), ``cores``; with ``telemetry.scope = "process-tree"`` (local machines)
  the agent's own process tree's, marked ``scope``, with no per-core list and ``memory.used_bytes`` its RSS
- ``memory``: ``total_bytes``, ``available_bytes``, ``used_bytes``, ``free_bytes``, ``buffers_bytes``,
  ``cached_bytes``, ``swap_total_bytes``, ``swap_used_bytes``, ``swap_free_bytes``
- ``disk``: ``filesystems`` (list of ``mountpoint``, ``device``, ``fstype``, ``size_bytes``, ``used_bytes``,
  ``avail_bytes``), ``io`` (device → ``read_bytes``, ``written_bytes``, ``reads``, ``writes``, ``io_time_seconds``)
- ``network``: interface → ``receive_bytes``, ``transmit_bytes``, ``receive_packets``, ``transmit_packets``,
  ``receive_errors``, ``transmit_errors``, ``receive_drop``, ``transmit_drop``
- ``load``: ``load1``, ``load5``, ``load15``
- ``processes``: ``count``, ``running``, ``threads``
- ``gpu``: list, one map per device: ``index``, ``uuid``, ``name``, ``utilization_gpu_percent``,
  ``utilization_memory_percent``, ``memory_used_bytes``, ``memory_total_bytes``, ``power_watts``,
  ``energy_joules``, ``temperature_celsius``, ``sm_clock_hertz``, ``memory_clock_hertz``,
  ``clock_event_reasons`` (NVML bitmask), ``ecc_corrected_errors``, ``ecc_uncorrected_errors``,
  ``processes`` (list of ``pid``, ``used_memory_bytes``), ``xid_errors`` (XID code as a string → count),
  ``xid_last`` (the latest XID code).
  A key the device does not support is absent.
- ``gpu_profiling``: list, one map per GPU with NVML GPM readings over the last interval (collectors/gpm.py):
  ``index``, ``uuid``, ``name``, ``sm_active_percent``, ``sm_occupancy_percent``, ``tensor_active_percent``,
  ``dram_active_percent``, ``fp16/fp32/fp64_active_percent``, ``graphics_active_percent``,
  ``pcie_transmit/receive_bytes_per_second``, ``nvlink_transmit/receive_bytes_per_second``. Empty without GPM.
"""

from __future__ import annotations

from typing import Any

import msgpack

Sample = dict[str, Any]


def pack(sample: Sample) -> bytes:
    data: bytes = msgpack.packb(sample, use_bin_type=True)
    return data


def unpack(frame: bytes) -> Sample:
    sample: Sample = msgpack.unpackb(frame, raw=False, strict_map_key=False)
    return sample


def is_sample(obj: object) -> bool:
    return isinstance(obj, dict) and isinstance(obj.get("seq"), int) and isinstance(obj.get("t"), int | float)


def array_header(n: int) -> bytes:
    """The msgpack header of an array of ``n`` items."""
    if n < 16:
        return bytes([0x90 | n])
    if n < 1 << 16:
        return b"\xdc" + n.to_bytes(2, "big")
    return b"\xdd" + n.to_bytes(4, "big")
