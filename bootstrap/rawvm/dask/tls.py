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
import os
from dataclasses import dataclass
from pathlib import Path

from rawvm.errors import UsageError

_VALID = datetime.timedelta(days=7)  # longer than any max_lifetime a cluster may have; the CA dies with it


@dataclass(frozen=True)
class TlsFiles:
    """The PEM files of one cluster, in ``directory`` (0700)."""

    directory: Path

    @property
    def ca(self) -> Path:
        return self.directory / "ca.pem"

    @property
    def node_cert(self) -> Path:
        return self.directory / "node.pem"

    @property
    def node_key(self) -> Path:
        return self.directory / "node.key"

    @property
    def client_cert(self) -> Path:
        return self.directory / "client.pem"

    @property
    def client_key(self) -> Path:
        return self.directory / "client.key"


def _write_private(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)


def make_cluster_tls(cluster: str, directory: Path) -> TlsFiles:
    """A fresh CA for ``cluster`` and the node and client certificates it signs, written into ``directory``."""
    try:
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
    except ImportError:
        raise UsageError("Dask clusters need the 'dask' extra: pip install 'rawvm[dask]'") from None

    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(directory, 0o700)
    now = datetime.datetime.now(datetime.UTC) - datetime.timedelta(minutes=5)  # clocks of fresh VMs drift
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"rawvm dask CA {cluster}")])
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(now + _VALID)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .sign(ca_key, hashes.SHA256())
    )

    def leaf(common_name: str) -> tuple[bytes, bytes]:
        key = ec.generate_private_key(ec.SECP256R1())
        cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
            .issuer_name(ca_name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now)
            .not_valid_after(now + _VALID)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
                critical=False,
            )
            .add_extension(
                x509.SubjectAlternativeName(
                    [x509.DNSName("localhost"), x509.IPAddress(ipaddress.IPv4Address("127.0.0.1"))]
                ),
                critical=False,
            )
            .sign(ca_key, hashes.SHA256())
        )
        key_pem = key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
        return cert.public_bytes(serialization.Encoding.PEM), key_pem

    files = TlsFiles(directory)
    files.ca.write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    node_cert, node_key = leaf(f"rawvm dask node {cluster}")
    client_cert, client_key = leaf(f"rawvm dask client {cluster}")
    files.node_cert.write_bytes(node_cert)
    _write_private(files.node_key, node_key)
    files.client_cert.write_bytes(client_cert)
    _write_private(files.client_key, client_key)
    return files  # the CA's own key is never written: nothing can sign another certificate for this cluster
