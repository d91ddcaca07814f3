"""Memory and swap, in bytes."""

from __future__ import annotations

from collections.abc import Iterator

import psutil

from rawvm_agent.telemetry.prometheus import gauge

_MEMORY = ("total", "available", "used", "free", "buffers", "cached")
_SWAP = ("total", "used", "free")


class MemoryCollector:
    name = "memory"

    def collect(self) -> dict[str, int]:
        mem = psutil.virtual_memory()
        swap = psutil.swap_memory()
        out = {f"{field}_bytes": int(getattr(mem, field)) for field in _MEMORY if hasattr(mem, field)}
        out.update({f"swap_{field}_bytes": int(getattr(swap, field)) for field in _SWAP})
        return out

    def metrics(self, value: dict[str, int]) -> Iterator[str]:
        for key, bytes_ in value.items():
            if key.startswith("swap_"):
                what = key.removeprefix("swap_").removesuffix("_bytes")
                yield gauge(f"rawvm_{key}", f"Swap space {what}, in bytes.", bytes_)
            else:
                what = key.removesuffix("_bytes")
                yield gauge(f"rawvm_memory_{key}", f"Memory {what}, in bytes.", bytes_)

    def close(self) -> None:
        pass
