"""Regenerate datascience-macos-arm64/: the benchmark's ~150-package macOS arm64 environment, as dist-info trees.

uv resolves requested.txt for macOS 14 arm64 / Python 3.11; each dist-info gets the real wheel's METADATA (headers
only: the long description is dropped to keep the committed data small) and WHEEL. Run from the repository root:
    uv run python bench/data/build_env.py
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1]))

from tests.resolver.foreign_env import ForeignPackage, foreign_packages, write_dist_info  # noqa: E402

TARGET = HERE / "datascience-macos-arm64"


def headers_only(metadata: str) -> str:
    kept = []
    for line in metadata.split("\n\n", 1)[0].splitlines():
        if line.startswith("Description:") or (kept and kept[-1] is None and line[:1] in (" ", "\t")):
            kept.append(None)
            continue
        kept.append(line)
    return "\n".join(line for line in kept if line is not None) + "\n"


def main() -> None:
    requested_lines = [
        line.strip() for line in (HERE / "requested.txt").read_text().splitlines() if line.strip() and line[0] != "#"
    ]
    wanted = {line.split("[")[0].lower() for line in requested_lines}
    shutil.rmtree(TARGET, ignore_errors=True)
    site = TARGET / "lib" / "python3.11" / "site-packages"
    site.mkdir(parents=True)
    (TARGET / "pyvenv.cfg").write_text("home = /opt/homebrew/opt/python@3.11/bin\nversion_info = 3.11.9\n")
    packages = foreign_packages(requested_lines, python="3.11")
    for package in packages:
        slim = ForeignPackage(
            package.name, package.version, package.wheel_filename, headers_only(package.metadata), package.wheel
        )
        write_dist_info(site, slim, requested=package.name.lower() in wanted)
    print(f"{len(packages)} distributions in {TARGET}")


if __name__ == "__main__":
    main()
