"""Rules for carrying a conda spec from the source machine (often osx-arm64) to a Linux subdir.

Each rule is a small pure function with a reason; tests/resolver/test_conda_specs.py has a test beside each.
"""

from __future__ import annotations

import re

from rattler import MatchSpec
from rattler.exceptions import InvalidMatchSpecError

from rawvm_resolver.errors import InputError

# Packages that only make sense on macOS: the target's solve brings its own equivalents (if any are needed).
_MACOS_ONLY: dict[str, str] = {
    "libcxx": "macOS C++ runtime; Linux builds link libstdcxx from the solve",
    "libcxxabi": "macOS C++ runtime; Linux builds link libstdcxx from the solve",
    "llvm-openmp": "macOS OpenMP runtime; Linux builds use libgomp through _openmp_mutex",
    "libgfortran": "macOS gfortran runtime (versioned differently there); the Linux solve picks its own",
    "libgfortran5": "macOS gfortran runtime build; the Linux solve picks its own",
    "appnope": "disables macOS App Nap; nothing on Linux needs it",
    "tensorflow-metal": "Apple GPU plugin for TensorFlow; exists only for macOS",
    "jax-metal": "Apple GPU plugin for JAX; exists only for macOS",
    "pyobjc-core": "Python/Objective-C bridge; exists only for macOS",
}
_MACOS_ONLY_PREFIXES = {"pyobjc-framework-": "Python bindings of a macOS framework; exist only for macOS"}
# Compiler activation packages, e.g. clang_osx-arm64: they configure a macOS toolchain.
_MACOS_ONLY_SUFFIX = re.compile(r"_osx-(arm64|64)$")

# `conda env export` writes exact pins as name=version=build; the build string belongs to the source subdir.
# A glob in either part (pytorch=2.2=*cuda*) is a request the user wrote, not an export pin: kept as written.
_EXPORT_PIN = re.compile(r"(?P<channel>[^\s:=]+::)?(?P<name>[A-Za-z0-9_.\-]+)=(?P<version>[^=\s*]+)=(?P<build>[^\s*]+)")
# A trailing conda subdir on a channel URL, e.g. .../conda-forge/osx-arm64.
_SUBDIR = re.compile(r"/(noarch|(linux|osx|win|emscripten|wasi|zos)-[a-z0-9_]+)$")
_ANACONDA_ORG = "https://conda.anaconda.org/"


def macos_only_reason(name: str) -> str | None:
    """Why ``name`` is left out of a Linux solve, or None when it is carried over."""
    name = name.lower()
    if name in _MACOS_ONLY:
        return _MACOS_ONLY[name]
    for prefix, reason in _MACOS_ONLY_PREFIXES.items():
        if name.startswith(prefix):
            return reason
    if _MACOS_ONLY_SUFFIX.search(name):
        return "configures a macOS compiler toolchain"
    return None


def drop_build_string(spec: str) -> str:
    """``numpy=1.26.4=py311h…`` → ``numpy ==1.26.4``: keep the exact version, let the target pick its build."""
    spec = spec.strip()
    match = _EXPORT_PIN.fullmatch(spec)
    if match is None:
        return spec
    return f"{match['channel'] or ''}{match['name']} =={match['version']}"


def spec_name(spec: str) -> str:
    """The package name a MatchSpec string asks for, or InputError naming the bad spec."""
    try:
        name = MatchSpec(spec).name
    except InvalidMatchSpecError as exc:
        raise InputError(
            f"invalid conda spec {spec!r}: {exc}; use conda's MatchSpec syntax, e.g. numpy>=1.26"
        ) from None
    return str(name.normalized)


def carry_over(spec: str) -> str | None:
    """The spec to solve for Linux, or None when the package exists only for macOS."""
    spec = drop_build_string(spec)
    return None if macos_only_reason(spec_name(spec)) else spec


def normalize_channel(channel: str) -> str:
    """``https://conda.anaconda.org/conda-forge/osx-arm64`` → ``conda-forge``; other URLs lose the subdir only."""
    channel = _SUBDIR.sub("", channel.strip().rstrip("/"))
    if channel.startswith(_ANACONDA_ORG) and not channel.startswith(_ANACONDA_ORG + "t/"):  # t/<token>: keep
        return channel[len(_ANACONDA_ORG) :]
    return channel


# What conda means by "defaults" on Linux and macOS (conda's DEFAULT_CHANNELS_UNIX).
_DEFAULTS = ("https://repo.anaconda.com/pkgs/main", "https://repo.anaconda.com/pkgs/r")


def expand_channels(channels: list[str]) -> tuple[str, ...]:
    """An environment.yml channel list as URLs or names rattler understands, in order, without repeats."""
    out: list[str] = []
    for channel in channels:
        if channel == "nodefaults":  # a marker telling conda not to add defaults, not a channel
            continue
        for name in _DEFAULTS if channel == "defaults" else (normalize_channel(channel),):
            if name not in out:
                out.append(name)
    return tuple(out)
