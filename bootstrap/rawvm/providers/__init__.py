"""Providers sit behind one protocol (as httpx's transports sit behind its client): local, qemu, aws."""

from __future__ import annotations

from rawvm.errors import UsageError
from rawvm.options import PROVIDERS
from rawvm.providers.base import Machine, MachineSpec, Provider

FREE_PROVIDERS = frozenset({"local", "qemu"})  # machines on this host: no price, no bill


def get_provider(name: str, **options: object) -> Provider:
    """The provider called ``name``; imports lazily so ``local`` never pays for boto3."""
    if name == "local":
        from rawvm.providers.local import LocalProvider

        return LocalProvider(**options)  # type: ignore[arg-type]
    if name == "qemu":
        from rawvm.providers.qemu import QemuProvider

        return QemuProvider(**options)  # type: ignore[arg-type]
    if name == "aws":
        from rawvm.providers.aws.provider import AwsProvider

        return AwsProvider(**options)  # type: ignore[arg-type]
    raise UsageError(f"unknown provider {name!r}: choose one of {', '.join(PROVIDERS)}")


__all__ = ["FREE_PROVIDERS", "PROVIDERS", "Machine", "MachineSpec", "Provider", "get_provider"]
