"""The agent channel's credentials: a per-cluster CA made on the laptop, and the mutual-TLS contexts.

Every cluster gets its own CA, made here with ``cryptography`` and signed with a key that lives only in memory
(nothing can sign another certificate for the cluster once the launch is over). It signs two leaves:

- the **server** certificate the cluster's agents serve (every machine of a launch shares one user-data, so a
  per-machine key could not be told apart anyway); it also names ``CLIENT_AUTH`` because the machine's own call
  workers present it when they reach their agent over loopback;
- the **client** certificate the laptop presents; it never leaves the laptop.

The laptop pins the cluster CA (never the system trust store) and checks no host name: machines have no stable
name, and a recycled EC2 address cannot present a certificate of this CA. Files live in one 0700 directory per
cluster (``clusters_dir()/<name>.tls/``, made by ``rawvm.clusters``); the keys are 0600. ``rawvm.dask.tls`` makes
Dask's CA with the same ``Authority``.
"""

from __future__ import annotations

import dataclasses
import datetime
import os
import ssl
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rawvm_agent.config import AgentConfig

from rawvm.errors import RawvmError

CLOCK_SKEW = datetime.timedelta(minutes=5)  # certificates start this early: clocks of fresh VMs drift
MARGIN = datetime.timedelta(hours=1)  # past the backstop: a machine that outlives it by a little still serves


def write_private(path: Path, data: bytes) -> None:
    """``data`` into ``path``, mode 0600 from the first byte (no window in which another user could open it)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)
    os.chmod(path, 0o600)  # O_CREAT's mode does not apply to a file that existed


def private_dir(directory: Path) -> Path:
    """``directory``, made 0700 (and made so again if it existed)."""
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(directory, 0o700)
    return directory


class Authority:
    """A certificate authority held in memory: ``issue`` signs leaves; its key is never serialized."""

    def __init__(self, common_name: str, valid: datetime.timedelta) -> None:
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.x509.oid import NameOID

        self._not_before = datetime.datetime.now(datetime.UTC) - CLOCK_SKEW
        self._not_after = self._not_before + CLOCK_SKEW + valid
        self._key = ec.generate_private_key(ec.SECP256R1())
        self._name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
        usage = x509.KeyUsage(
            digital_signature=True,
            content_commitment=False,
            key_encipherment=False,
            data_encipherment=False,
            key_agreement=False,
            key_cert_sign=True,
            crl_sign=True,
            encipher_only=False,
            decipher_only=False,
        )
        cert = (
            self._builder(self._name, self._key.public_key())
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(usage, critical=True)
            .sign(self._key, hashes.SHA256())
        )
        self.cert_pem: bytes = cert.public_bytes(serialization.Encoding.PEM)

    def _builder(self, subject: Any, public_key: Any) -> Any:
        from cryptography import x509

        return (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(self._name)
            .public_key(public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(self._not_before)
            .not_valid_after(self._not_after)
        )

    def issue(self, common_name: str, usages: Sequence[str], alt_names: Sequence[Any] = ()) -> tuple[bytes, bytes]:
        """A fresh EC P-256 leaf for ``common_name`` with extended key ``usages`` (``server``, ``client``):
        its certificate and its key (PKCS#8), both PEM."""
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

        oids = {"server": ExtendedKeyUsageOID.SERVER_AUTH, "client": ExtendedKeyUsageOID.CLIENT_AUTH}
        key = ec.generate_private_key(ec.SECP256R1())
        builder = (
            self._builder(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]), key.public_key())
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([oids[u] for u in usages]), critical=False)
        )
        if alt_names:
            builder = builder.add_extension(x509.SubjectAlternativeName(list(alt_names)), critical=False)
        cert = builder.sign(self._key, hashes.SHA256())
        key_pem = key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
        return cert.public_bytes(serialization.Encoding.PEM), key_pem


@dataclass(frozen=True)
class ServerCredentials:
    """What a provider delivers to every machine of a cluster (PEM bytes): the agent's certificate and key, and
    the cluster CA the agent checks client certificates against. The key is secret: 0600 wherever it is written."""

    ca: bytes
    cert: bytes
    key: bytes

    def files(self, directory: str) -> list[tuple[str, bytes]]:
        """``(path, PEM)`` of each file a machine keeps in ``directory``, as ``configure`` names them."""
        return [
            (f"{directory}/agent.crt", self.cert),
            (f"{directory}/agent.key", self.key),
            (f"{directory}/ca.crt", self.ca),
        ]

    @staticmethod
    def configure(config: AgentConfig, directory: str) -> AgentConfig:
        """``config`` serving mutual TLS from the files ``files(directory)`` names."""
        return dataclasses.replace(
            config, tls_cert=f"{directory}/agent.crt", tls_key=f"{directory}/agent.key", tls_ca=f"{directory}/ca.crt"
        )


@dataclass(frozen=True)
class ChannelFiles:
    """The PEM files of one cluster's agent channel, in ``directory`` (0700)."""

    directory: Path

    @property
    def ca(self) -> Path:
        return self.directory / "ca.pem"

    @property
    def client_cert(self) -> Path:
        return self.directory / "client.pem"

    @property
    def client_key(self) -> Path:
        return self.directory / "client.key"

    def exists(self) -> bool:
        return all(p.is_file() for p in (self.ca, self.client_cert, self.client_key))


def make_channel(cluster: str, directory: Path, lifetime_s: float) -> tuple[ChannelFiles, ServerCredentials]:
    """A fresh CA for ``cluster``, valid ``lifetime_s`` (the machines' max_lifetime plus the backstop's grace) and
    a margin, and the leaves it signs: the laptop's (written into ``directory``, 0700, with the CA certificate; every
    file 0600) and the agents' (returned, for the provider to deliver; the laptop keeps no copy of its key)."""
    authority = Authority(f"rawvm agent CA {cluster}", datetime.timedelta(seconds=lifetime_s) + MARGIN)
    server_cert, server_key = authority.issue(f"rawvm agent {cluster}", ["server", "client"])
    client_cert, client_key = authority.issue(f"rawvm laptop {cluster}", ["client"])
    files = ChannelFiles(private_dir(directory))
    for path, data in (
        (files.ca, authority.cert_pem),
        (files.client_cert, client_cert),
        (files.client_key, client_key),
    ):
        write_private(path, data)
    # The CA's key goes with ``authority``: it was never written.
    return files, ServerCredentials(ca=authority.cert_pem, cert=server_cert, key=server_key)


def client_context(files: ChannelFiles) -> ssl.SSLContext:
    """The laptop's side of the channel: trusts only the cluster CA, checks no host name (the pinned CA is the
    agent's identity), and presents the laptop's client certificate."""
    if not files.exists():
        raise RawvmError(
            f"the TLS files of this cluster ({files.directory}) are missing: it was launched by an older rawvm "
            "without the encrypted agent channel, which this rawvm refuses to talk to; take it down with your "
            "cloud's console (or 'rawvm down', which stops what it can) and launch it again"
        )
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.check_hostname = False  # must come before verify_mode: machines have no stable name to check
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.load_verify_locations(cafile=str(files.ca))  # the only trust anchor: never the system store
    ctx.load_cert_chain(str(files.client_cert), str(files.client_key))
    return ctx
