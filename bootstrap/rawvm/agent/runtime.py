"""The agent's venv, built here for the machine's Python and unpacked there with ``tar``: the agent's fast path.

Made on the machine itself, the agent's venv is the slowest part of a boot: uv must arrive first, then resolve
the agent's hashed requirements against the index, download a dozen wheels, unpack them and compile their
bytecode (10.8 s of a 21.3 s overhead over a bare boot, measured under TCG by bench/startup.py). The laptop knows
the machine's Python (``Provider.target_python``), architecture and glibc, so it makes that venv here instead:
``uv pip install --target`` of the same hashed requirements and the agent wheel for that platform (the wheels
come from the laptop's uv cache; uv checks every hash), bytecode compiled by a local interpreter of the same
minor version when there is one, the venv's own files (``pyvenv.cfg``, ``bin/python`` -> ``/usr/bin/python3``,
``bin/rawvm-agent``), all in one deterministic ``.tar.gz`` staged beside the agent wheel and pinned by its sha256
in the user-data. The machine checks the sha256, checks that its ``/usr/bin/python3`` is that minor version,
and unpacks the archive into ``/opt/rawvm/agent``: no uv, no index, no compiler on the way to the agent's start,
so uv itself downloads while the agent starts. A machine whose Python differs takes the old path (uv, the hashed
requirements, the wheel), which the user-data keeps.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import shutil
import subprocess
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path

from rawvm.agent import requirements
from rawvm.agent.wheel import cache_dir
from rawvm.errors import RawvmError
from rawvm.files import sha256_file

AGENT_VENV = "/opt/rawvm/agent"  # where the archive is unpacked (the systemd unit runs bin/rawvm-agent there)
SYSTEM_PYTHON = "/usr/bin/python3"  # the venv's interpreter on the machine: the one the user-data checks
_FORMAT = "2"  # bump when the archive's layout changes, so cached archives are rebuilt
_MTIME = 315532800  # 1980-01-01: no build time leaks into the archive
_UNREPRODUCIBLE = ("direct_url.json", "uv_cache.json")
_ENTRY_POINT = f"""#!{AGENT_VENV}/bin/python
import sys

from rawvm_agent.__main__ import main

if __name__ == "__main__":
    sys.exit(main())
"""


@dataclass(frozen=True)
class RuntimeTarget:
    """The machine the archive is for."""

    python: str
    """The machine's ``python3`` as ``X.Y`` (its venv's ``lib/pythonX.Y``; the wheels' ``cpXY`` tags)."""
    arch: str
    """``x86_64`` or ``aarch64``."""
    glibc: str
    """The machine's glibc as ``X.Y``: the newest ``manylinux`` wheels it can load."""

    @property
    def platform(self) -> str:
        """uv's ``--python-platform`` for the target, e.g. ``x86_64-manylinux_2_36``."""
        return f"{self.arch}-manylinux_{self.glibc.replace('.', '_')}"


def build_agent_runtime(wheel: Path, target: RuntimeTarget) -> Path:
    """The archive (cached by the wheel, its requirements and the target) of the agent's venv for ``target``."""
    reqs = requirements.requirements_path(wheel)
    digest = hashlib.sha256(f"rawvm-agent-runtime {_FORMAT} {target}\n".encode())
    for path in (wheel, reqs):
        digest.update(bytes.fromhex(sha256_file(path)))
    slot = cache_dir() / "agent-runtimes"
    archive = slot / f"agent-{target.python}-{target.arch}-{digest.hexdigest()[:32]}.tar.gz"
    if archive.is_file():
        return archive
    slot.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=slot, prefix=".build-") as tmp:
        venv = Path(tmp) / "venv"
        site = venv / "lib" / f"python{target.python}" / "site-packages"
        install = ["pip", "install", "--quiet", "--target", str(site), "--python-platform", target.platform]
        install += ["--python-version", target.python, "--only-binary", ":all:", "--no-compile"]
        env = {**os.environ, "UV_PYTHON_DOWNLOADS": "never"}  # a Python is not needed, only its tags
        requirements.run_uv([*install, "--require-hashes", "-r", str(reqs)], "the agent's dependencies", env=env)
        requirements.run_uv([*install, "--no-deps", str(wheel)], "the agent wheel", env=env)
        _tidy(site)
        _compile(venv, site, target.python)
        _write_venv_files(venv, target.python)
        partial = Path(tmp) / archive.name
        _pack(venv, partial)
        partial.replace(archive)  # atomic: a concurrent build of the same archive simply wins or loses the race
    return archive


def _tidy(site: Path) -> None:
    """Leave out what names this machine or this moment, so the same inputs give the same bytes: uv's entry points
    (this machine's interpreter in their first line; the venv gets its own ``bin/rawvm-agent``), the agent
    wheel's ``direct_url.json`` (its path here) and uv's ``uv_cache.json`` (a timestamp), and their RECORD lines."""
    shutil.rmtree(site / "bin", ignore_errors=True)
    for dist_info in site.glob("*.dist-info"):
        for name in _UNREPRODUCIBLE:
            (dist_info / name).unlink(missing_ok=True)
        record = dist_info / "RECORD"
        if record.is_file():
            gone = (*(f"{dist_info.name}/{name}," for name in _UNREPRODUCIBLE), "bin/")
            lines = record.read_text().splitlines(keepends=True)
            record.write_text("".join(line for line in lines if not line.startswith(gone)))


def _compile(venv: Path, site: Path, python: str) -> None:
    """Bytecode by a local Python of the machine's minor version, if there is one (else the agent compiles what
    it imports on its first start). ``unchecked-hash``: valid whatever mtimes the archive gives the sources; the
    source paths compiled in are the machine's (``-s``/``-p``), not this build directory's, so the same inputs
    give the same bytes."""
    interpreter = _local_python(python)
    if interpreter is None:
        return
    compile_all = [interpreter, "-m", "compileall", "-q", "-j", "0", "--invalidation-mode", "unchecked-hash"]
    compile_all += ["-s", str(venv), "-p", AGENT_VENV]
    result = subprocess.run([*compile_all, str(site)], capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise RawvmError(f"compiling the agent's bytecode with {interpreter} failed: {result.stderr.strip()[-300:]}")


def _local_python(python: str) -> str | None:
    uv = os.environ.get("UV", "uv")
    find = [uv, "python", "find", "--python-preference", "only-system", python]
    try:
        result = subprocess.run(find, capture_output=True, text=True, check=False, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return None
    found = result.stdout.strip()
    return found if result.returncode == 0 and found else None


def _write_venv_files(venv: Path, python: str) -> None:
    (venv / "pyvenv.cfg").write_text(
        f"home = {Path(SYSTEM_PYTHON).parent}\ninclude-system-site-packages = false\nversion = {python}\n"
    )
    bin_dir = venv / "bin"
    bin_dir.mkdir()
    (bin_dir / "python").symlink_to(SYSTEM_PYTHON)
    for alias in ("python3", f"python{python}"):
        (bin_dir / alias).symlink_to("python")
    (bin_dir / "rawvm-agent").write_text(_ENTRY_POINT)


def _pack(venv: Path, out: Path) -> None:
    """A gzip'd tar of ``venv``'s contents, sorted, root-owned, one mtime: the same inputs give the same bytes."""

    def normalize(info: tarfile.TarInfo) -> tarfile.TarInfo:
        info.uid = info.gid = 0
        info.uname = info.gname = "root"
        info.mtime = _MTIME
        if info.isdir() or info.name == "bin/rawvm-agent":
            info.mode = 0o755
        elif info.isfile():
            info.mode = 0o755 if info.mode & 0o111 else 0o644
        return info

    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for path in sorted(venv.rglob("*"), key=lambda p: p.relative_to(venv).as_posix()):
            tar.add(path, arcname=path.relative_to(venv).as_posix(), recursive=False, filter=normalize)
    out.write_bytes(gzip.compress(buffer.getvalue(), compresslevel=6, mtime=0))
