"""The agent's own dependencies as a hashed requirements file, staged beside its wheel.

A machine installs them as root at boot, so nothing there may be resolved: ``agent-requirements.txt`` pins
every package with ``==`` and the sha256 of each of its artifacts, and the user-data installs it with
``uv pip install --require-hashes --only-binary :all:`` (no sdist, hence no unhashed build backend either) and
then the agent wheel with ``--no-deps``. From a workspace checkout the file is exported from the workspace's
``uv.lock`` (no network: the lock is universal, so one file serves linux x86_64 and aarch64 and every Python
the images have); from an installed rawvm it is compiled from the wheel's own ``Requires-Dist`` with
``uv pip compile --universal --generate-hashes`` (this needs the package index once; it is cached).
"""

from __future__ import annotations

import os
import re
import subprocess
import zipfile
from pathlib import Path

from rawvm.errors import RawvmError

REQUIREMENTS_NAME = "agent-requirements.txt"
DISTRIBUTION = "rawvm-agent"
_ENTRY = re.compile(r"([A-Za-z0-9][A-Za-z0-9._-]*)==[^\s;\\]+")
_HASH = re.compile(r"--hash=sha256:[0-9a-f]{64}")


def requirements_path(wheel: Path) -> Path:
    """Where the requirements of ``wheel`` live: beside it (in its cache slot, or the out_dir it was copied to)."""
    return wheel.parent / REQUIREMENTS_NAME


def normalize(name: str) -> str:
    """A distribution name as PEP 503 compares them."""
    return re.sub(r"[-_.]+", "-", name).lower()


def run_uv(args: list[str], what: str, *, cwd: Path | None = None, env: dict[str, str] | None = None) -> None:
    """Run ``uv`` (``$UV`` when set); RawvmError with uv's last line when it fails."""
    uv = os.environ.get("UV", "uv")
    try:
        result = subprocess.run([uv, *args], cwd=cwd, env=env, capture_output=True, text=True, check=False)
    except FileNotFoundError:
        raise RawvmError("uv not found: install uv (https://docs.astral.sh/uv/) to build the agent wheel") from None
    if result.returncode != 0:
        tail = (result.stderr or result.stdout).strip().splitlines()[-1:] or ["no output"]
        raise RawvmError(f"{what} failed: {tail[0]}")


def export_locked(project: Path, out: Path) -> None:
    """The agent's dependencies as the workspace lock pins them (``--frozen``: the lock is read, never
    re-resolved; ``check`` then makes sure it covers what the wheel requires)."""
    run_uv(
        [
            "export",
            "--frozen",
            "--package",
            DISTRIBUTION,
            "--no-emit-project",
            "--no-emit-workspace",
            "--no-dev",
            "--hashes",
            "--no-header",
            "--no-annotate",
            "--quiet",
            "--output-file",
            str(out),
        ],
        "exporting the rawvm-agent requirements from uv.lock",
        cwd=project,
    )


def compile_for(wheel: Path, out: Path) -> None:
    """For an installed rawvm (no workspace lock): resolve the wheel's requirements once, with hashes."""
    source = out.with_name("agent-requirements.in")
    source.write_text("".join(f"{r}\n" for r in wheel_requirements(wheel).values()))
    compile_args = ["compile", "--quiet", "--universal", "--generate-hashes", "--no-header", "--no-annotate"]
    run_uv(
        ["pip", *compile_args, "--python-version", "3.11", "--output-file", str(out), str(source)],
        "resolving the rawvm-agent requirements (uv pip compile)",
    )
    source.unlink()


def wheel_requirements(wheel: Path) -> dict[str, str]:
    """normalized name -> requirement, from the wheel's METADATA ``Requires-Dist`` (extras left out: the
    machine installs the agent without them)."""
    with zipfile.ZipFile(wheel) as zf:
        (name,) = [n for n in zf.namelist() if n.endswith(".dist-info/METADATA") and n.count("/") == 1]
        text = zf.read(name).decode()
    found: dict[str, str] = {}
    for line in text.splitlines():
        if line.startswith("Requires-Dist:") and "extra ==" not in line:
            requirement = line.removeprefix("Requires-Dist:").strip()
            if match := re.match(r"[A-Za-z0-9][A-Za-z0-9._-]*", requirement):
                found[normalize(match.group(0))] = requirement
    return found


def pinned(text: str) -> dict[str, list[str]]:
    """normalized name -> its ``--hash=sha256:`` options, for each entry of a requirements file; RawvmError
    when an entry is not ``name==version`` or has no hash (``--require-hashes`` would refuse it at boot)."""
    entries: dict[str, list[str]] = {}
    for block in re.split(r"\n(?=\S)", text.strip()):
        if not block or block.startswith("#"):
            continue
        match = _ENTRY.match(block)
        hashes = _HASH.findall(block)
        if not match or not hashes:
            raise RawvmError(f"agent requirement {block.splitlines()[0]!r} is not pinned with --hash=sha256")
        entries[normalize(match.group(1))] = hashes
    return entries


def check(requirements: Path, wheel: Path) -> None:
    """Every entry pinned with hashes, and every dependency of the wheel among them (a stale lock would leave
    one out, and the agent, installed with --no-deps, would not start)."""
    entries = pinned(requirements.read_text())
    missing = sorted(set(wheel_requirements(wheel)) - set(entries))
    if missing:
        raise RawvmError(
            f"the agent's hashed requirements lack {', '.join(missing)}: run 'uv lock' in the rawvm workspace"
        )
