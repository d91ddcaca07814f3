"""Write the environment bundle exactly as docs/architecture.md "Contract 1" says.

Identical inputs give identical bytes: sorted keys and files, no timestamps. The bundle is written next to
its destination and moved into place, so a failed lock never leaves half a bundle.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import tomli_w

from rawvm_resolver.environment import SourcePlatform
from rawvm_resolver.errors import InputError
from rawvm_resolver.report import ReportRow, sorted_rows
from rawvm_resolver.target import Target

MANIFEST = "rawvm-env.toml"
FORMAT = 1


@dataclass
class BundleContents:
    target: Target
    source: SourcePlatform
    fingerprint: str
    pylock: str
    code: bytes
    conda_lock: bytes | None = None
    local_files: dict[str, Path] = field(default_factory=dict)  # bundle path (wheels/...) -> built file
    extra_index_urls: list[str] = field(default_factory=list)
    index_url: str = ""
    build_constraints: list[str] = field(default_factory=list)
    rows: list[ReportRow] = field(default_factory=list)


def sha256_file(path: Path) -> str:
    with path.open("rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def manifest_document(contents: BundleContents, files: list[dict[str, str]]) -> dict[str, Any]:
    target = contents.target
    return {
        "format": FORMAT,
        "target": {
            "os": target.os,
            "arch": target.arch,
            "glibc": target.glibc,
            "python": target.python,
            "accelerator": target.accelerator,
            "cuda": target.cuda if target.is_cuda else "",
        },
        "source": {
            "python": contents.source.python,
            "platform": contents.source.platform,
            "fingerprint": contents.fingerprint,
        },
        "install": {
            "index_url": contents.index_url,
            "extra_index_urls": list(contents.extra_index_urls),
            **({"build_constraints": list(contents.build_constraints)} if contents.build_constraints else {}),
        },
        "files": sorted(files, key=lambda entry: entry["path"]),
        "report": [asdict(row) for row in sorted_rows(contents.rows)],
    }


def write_bundle(out_dir: Path, contents: BundleContents) -> str:
    """Write the bundle; the sha256 of its rawvm-env.toml (the root of trust)."""
    out_dir = out_dir.resolve()
    _check_destination(out_dir)
    staging = out_dir.with_name(f".{out_dir.name}.partial-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        files = _write_files(staging, contents)
        manifest = tomli_w.dumps(manifest_document(contents, files)).encode()
        (staging / MANIFEST).write_bytes(manifest)
        if out_dir.exists():
            shutil.rmtree(out_dir)
        staging.rename(out_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return hashlib.sha256(manifest).hexdigest()


def _write_files(staging: Path, contents: BundleContents) -> list[dict[str, str]]:
    written: dict[str, tuple[bytes | Path, str]] = {
        "pylock.toml": (contents.pylock.encode(), "pylock"),
        "code.tar.gz": (contents.code, "code"),
    }
    if contents.conda_lock is not None:
        written["conda-lock.yml"] = (contents.conda_lock, "conda-lock")
    for bundle_path, built in contents.local_files.items():
        written[bundle_path] = (built, "sdist" if bundle_path.endswith((".tar.gz", ".zip")) else "wheel")
    files = []
    for bundle_path, (data, kind) in sorted(written.items()):
        destination = staging / bundle_path
        destination.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(data, Path):
            shutil.copyfile(data, destination)
        else:
            destination.write_bytes(data)
        files.append({"path": bundle_path, "sha256": sha256_file(destination), "kind": kind})
    return files


def _check_destination(out_dir: Path) -> None:
    if out_dir.is_file():
        raise InputError(f"{out_dir} is a file: -o wants a directory for the bundle")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not (out_dir / MANIFEST).is_file():
        raise InputError(f"{out_dir} is not empty and holds no bundle: pick an empty or new directory for -o")
