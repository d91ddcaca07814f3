"""The machine a lock is for: Linux, an architecture, a glibc level, a Python, CPU or CUDA."""

from __future__ import annotations

import re
from dataclasses import dataclass

from rawvm_resolver.errors import InputError

PLATFORMS = ("linux-x86_64", "linux-aarch64")
_ARCH_ALIASES = {"x86_64": "x86_64", "amd64": "x86_64", "aarch64": "aarch64", "arm64": "aarch64"}
DEFAULT_GLIBC = "2.28"
DEFAULT_CUDA = "12.8"


@dataclass(frozen=True)
class Target:
    arch: str  # x86_64 | aarch64
    python: str  # X.Y
    os: str = "linux"
    glibc: str = DEFAULT_GLIBC  # manylinux level the image supports
    accelerator: str = "cpu"  # cpu | cuda
    cuda: str = ""  # X.Y when accelerator == "cuda"

    @property
    def platform(self) -> str:
        return f"{self.os}-{self.arch}"

    @property
    def uv_python_platform(self) -> str:
        """The value for ``uv pip compile --python-platform``."""
        return f"{self.arch}-manylinux_{self.glibc.replace('.', '_')}"

    @property
    def conda_subdir(self) -> str:
        return "linux-64" if self.arch == "x86_64" else "linux-aarch64"

    @property
    def is_cuda(self) -> bool:
        return self.accelerator == "cuda"


def parse_platform(text: str) -> str:
    """Normalise ``linux-x86_64`` / ``linux-amd64`` / ``linux-arm64`` ...; the arch, or InputError."""
    match = re.fullmatch(r"linux[-_/](\w+)", text.strip().lower())
    arch = _ARCH_ALIASES.get(match.group(1)) if match else None
    if arch is None:
        raise InputError(f"unknown platform {text!r}: choose one of {', '.join(PLATFORMS)}")
    return arch


def parse_python_version(text: str) -> str:
    if not re.fullmatch(r"3\.\d{1,2}", text.strip()):
        raise InputError(f"invalid Python version {text!r}: use X.Y, e.g. 3.12")
    return text.strip()


def parse_glibc_version(text: str) -> str:
    """``2.39`` -> ``2.39``; the manylinux level a lock targets (the image's glibc)."""
    if not re.fullmatch(r"2\.\d{1,2}", text.strip()) or int(text.strip().split(".")[1]) < 17:
        raise InputError(f"invalid glibc version {text!r}: use 2.X with X >= 17, e.g. 2.39 (Ubuntu 24.04)")
    return text.strip()


def parse_cuda_version(text: str) -> str:
    if not re.fullmatch(r"\d{2}\.\d", text.strip()):
        raise InputError(f"invalid CUDA version {text!r}: use X.Y, e.g. {DEFAULT_CUDA}")
    return text.strip()
