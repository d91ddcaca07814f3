"""Network IO counters per interface."""

from __future__ import annotations

from collections.abc import Iterator

import psutil

from rawvm_agent.telemetry.prometheus import family

_FIELDS = (  # sample key, psutil field, Prometheus name, help
    ("receive_bytes", "bytes_recv", "rawvm_network_receive_bytes_total", "Bytes received."),
    ("transmit_bytes", "bytes_sent", "rawvm_network_transmit_bytes_total", "Bytes sent."),
    ("receive_packets", "packets_recv", "rawvm_network_receive_packets_total", "Packets received."),
    ("transmit_packets", "packets_sent", "rawvm_network_transmit_packets_total", "Packets sent."),
    ("receive_errors", "errin", "rawvm_network_receive_errors_total", "Receive errors."),
    ("transmit_errors", "errout", "rawvm_network_transmit_errors_total", "Transmit errors."),
    ("receive_drop", "dropin", "rawvm_network_receive_drop_total", "Incoming packets dropped."),
    ("transmit_drop", "dropout", "rawvm_network_transmit_drop_total", "Outgoing packets dropped."),
)


class NetworkCollector:
    name = "network"

    def collect(self) -> dict[str, dict[str, int]]:
        counters = psutil.net_io_counters(pernic=True, nowrap=True)
        return {nic: {key: getattr(c, field) for key, field, _, _ in _FIELDS} for nic, c in counters.items()}

    def metrics(self, value: dict[str, dict[str, int]]) -> Iterator[str]:
        for key, _, name, help in _FIELDS:
            yield family(name, "counter", help, [({"device": nic}, c[key]) for nic, c in value.items()])

    def close(self) -> None:
        pass
