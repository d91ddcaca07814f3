"""Wheel platform tags: read a source platform from tags, and list the tags a Linux target accepts."""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable

from packaging.tags import Tag, compatible_tags, cpython_tags, parse_tag

_MACOS = re.compile(r"macosx_(\d+)_(\d+)_(\w+)")
_MANYLINUX = re.compile(r"manylinux_(\d+)_(\d+)_(\w+)")
_LEGACY_MANYLINUX = {"manylinux1": (2, 5), "manylinux2010": (2, 12), "manylinux2014": (2, 17)}


def describe_platform(tag: str) -> tuple[str, str, str]:
    """(os, arch, libc-or-macOS version) for a wheel platform tag; empty strings where unknown."""
    if match := _MACOS.fullmatch(tag):
        arch = "arm64" if match.group(3) in ("arm64", "universal2") else match.group(3)
        return "macos", arch, f"{match.group(1)}.{match.group(2)}"
    if match := _MANYLINUX.fullmatch(tag):
        return "linux", match.group(3), f"{match.group(1)}.{match.group(2)}"
    for legacy, (major, minor) in _LEGACY_MANYLINUX.items():
        if tag.startswith(legacy + "_"):
            return "linux", tag[len(legacy) + 1 :], f"{major}.{minor}"
    if tag.startswith("linux_"):
        return "linux", tag[len("linux_") :], ""
    if tag.startswith("win"):
        return "windows", "x86_64" if tag == "win_amd64" else tag.removeprefix("win_"), ""
    return "", "", ""


def dominant_platform(wheel_tags: Iterable[str]) -> str:
    """The platform an environment runs on, from its wheels' tags ("" when all are pure).

    The most common (os, arch) wins; within it the highest version, since the machine runs at least the newest
    macOS (or glibc) any installed wheel needs. Ties break by name, so scan order never matters.
    """
    counts: Counter[tuple[str, str]] = Counter()
    best: dict[tuple[str, str], tuple[tuple[int, ...], str]] = {}
    for text in wheel_tags:
        for tag in parse_tag(text):
            if tag.platform == "any":
                continue
            os_name, arch, version = describe_platform(tag.platform)
            key = (os_name, arch)
            counts[key] += 1
            rank = (tuple(int(part) for part in version.split(".") if part.isdigit()), tag.platform)
            best[key] = max(best.get(key, rank), rank)
    if not counts:
        return ""
    key = sorted(counts.items(), key=lambda item: (-item[1], item[0]))[0][0]
    return best[key][1]


def python_from_tags(wheel_tags: Iterable[str]) -> str:
    """X.Y from the cpXY interpreter tags of an environment's compiled wheels ("" when none)."""
    counts: Counter[str] = Counter()
    for text in wheel_tags:
        for tag in parse_tag(text):
            if match := re.fullmatch(r"cp3(\d+)", tag.interpreter):
                counts[f"3.{match.group(1)}"] += 1
    return counts.most_common(1)[0][0] if counts else ""


def linux_platform_tags(arch: str, glibc: str) -> list[str]:
    """Platform tags a manylinux image at ``glibc`` accepts, most specific first (PEP 600 + legacy aliases)."""
    major, minor = (int(part) for part in glibc.split("."))
    tags: list[str] = []
    for level in range(minor, 4, -1):
        tags.append(f"manylinux_{major}_{level}_{arch}")
        for legacy, (legacy_major, legacy_minor) in _LEGACY_MANYLINUX.items():
            if (legacy_major, legacy_minor) == (major, level):
                tags.append(f"{legacy}_{arch}")
    tags.append(f"linux_{arch}")
    return tags


def target_tags(python: str, arch: str, glibc: str) -> frozenset[Tag]:
    """Every wheel tag a CPython ``python`` on linux-``arch`` with ``glibc`` installs."""
    version = tuple(int(part) for part in python.split(".")[:2])
    platforms = linux_platform_tags(arch, glibc)
    return frozenset([*cpython_tags(version, platforms=platforms), *compatible_tags(version, platforms=platforms)])
