"""A per-cluster certificate authority for Dask's TLS, made on the laptop with ``cryptography``.

Every Dask cluster gets its own CA. The scheduler and the workers share one node certificate (every machine of an
EC2 launch shares one agent.toml and one bundle, so a per-machine key could not be told apart anyway); the laptop
keeps a client certificate of its own. Dask checks the peer's certificate against the CA on both sides of every
connection (mutual TLS) and does not check host names, so nothing without this cluster's CA-signed certificate
can talk to its scheduler or workers. The private keys are files with mode 0600 and are never printed or logged.
"""

from __future__ import annotations

import datetime
import ipaddress
from dataclasses import dataclass
from pathlib import Path

from rawvm.agent.tls import Authority, ChannelFiles, private_dir, write_private

_VALID = datetime.timedelta(days=7)  # longer than any max_lifetime a cluster may have; the CA dies with it


@dataclass(frozen=True)
class TlsFiles(ChannelFiles):
    """The PEM files of one Dask cluster, in ``directory`` (0700): the agent channel's layout (CA, laptop client)
    plus the node certificate and key the scheduler and workers share."""

    @property
    def node_cert(self) -> Path:
        return self.directory / "node.pem"

    @property
    def node_key(self) -> Path:
        return self.directory / "node.key"


def make_cluster_tls(cluster: str, directory: Path) -> TlsFiles:
    """A fresh CA for ``cluster`` and the node and client certificates it signs, written into ``directory``."""
    from cryptography import x509

    authority = Authority(f"rawvm dask CA {cluster}", _VALID)
    names = [x509.DNSName("localhost"), x509.IPAddress(ipaddress.IPv4Address("127.0.0.1"))]
    files = TlsFiles(private_dir(directory))
    files.ca.write_bytes(authority.cert_pem)
    for cert_path, key_path, role in (
        (files.node_cert, files.node_key, "node"),
        (files.client_cert, files.client_key, "client"),
    ):
        cert, key = authority.issue(f"rawvm dask {role} {cluster}", ["server", "client"], names)
        cert_path.write_bytes(cert)
        write_private(key_path, key)
    return files  # the CA's own key is never written: nothing can sign another certificate for this cluster
