"""What every collector provides. Each one reads one source and fails alone (node_exporter's model)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, Protocol


class Collector(Protocol):
    name: str  # the key of this collector's value in a sample

    def collect(self) -> Any:
        """This tick's reading: plain data (dicts, lists, numbers, strings) that msgpack and JSON can carry."""
        ...

    def metrics(self, value: Any) -> Iterator[str]:
        """Prometheus families (``prometheus.family`` text) for a value ``collect`` returned."""
        ...

    def close(self) -> None: ...
