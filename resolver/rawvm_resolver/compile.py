"""Drive ``uv pip compile`` for the target. uv does the resolution; this module only builds its inputs and
command line from a Plan, runs it, and reads the lock it wrote."""

from __future__ import annotations

import functools
import subprocess
import threading
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from uv import find_uv_bin

from rawvm_resolver.target import Target
from rawvm_resolver.translate import Plan
from rawvm_resolver.uv_pythons import UV_PYTHONS

_UV_BIN_LOCK = threading.Lock()
BUILD_CONSTRAINTS = "build-constraints.txt"
EXCLUDES = "excludes.txt"


@functools.cache
def uv_bin() -> str:
    """The uv binary. Found under a lock: sysconfig's first read is not thread-safe on Python 3.11, and locks
    run in threads (the corpus test, a caller's pool) would otherwise see ``EXE`` as None."""
    with _UV_BIN_LOCK:
        return find_uv_bin()


class UvFailure(Exception):
    """uv could not resolve; ``stderr`` holds its explanation."""

    def __init__(self, stderr: str) -> None:
        super().__init__(stderr)
        self.stderr = stderr


class UvTimeout(Exception):
    """uv was still resolving when its time was up (it was stopped)."""


@dataclass(frozen=True)
class CompileInputs:
    requirements: list[str]
    constraints: list[str]  # name==version
    target: Target
    extra_index_urls: list[str] = field(default_factory=list)
    build_constraints: list[str] = field(default_factory=list)
    excludes: list[str] = field(default_factory=list)


def write_inputs(inputs: CompileInputs, work_dir: Path) -> tuple[Path, Path]:
    work_dir.mkdir(parents=True, exist_ok=True)
    requirements = work_dir / "requirements.in"
    constraints = work_dir / "constraints.txt"
    requirements.write_text("".join(f"{line}\n" for line in inputs.requirements))
    constraints.write_text("".join(f"{line}\n" for line in inputs.constraints))
    if inputs.build_constraints:
        (work_dir / BUILD_CONSTRAINTS).write_text("".join(f"{line}\n" for line in inputs.build_constraints))
    if inputs.excludes:
        (work_dir / EXCLUDES).write_text("".join(f"{name}\n" for name in inputs.excludes))
    return requirements, constraints


def uv_compile_command(inputs: CompileInputs, requirements: Path, constraints: Path, output: Path) -> list[str]:
    """The exact ``uv pip compile`` command line rawvm runs (the benchmark runs it bare, too)."""
    command = [
        uv_bin(),
        "pip",
        "compile",
        str(requirements),
        "--constraint",
        str(constraints),
        "--python-platform",
        inputs.target.uv_python_platform,
        "--python-version",
        inputs.target.python,
        "--format",
        "pylock.toml",
        "--output-file",
        str(output),
        "--no-header",
        "--quiet",
    ]
    for url in inputs.extra_index_urls:
        command += ["--extra-index-url", url]
    if inputs.build_constraints:
        command += ["--build-constraints", str(requirements.parent / BUILD_CONSTRAINTS)]
    if inputs.excludes:
        command += ["--excludes", str(requirements.parent / EXCLUDES)]
    if inputs.extra_index_urls:
        # The torch index mirrors numpy, pillow, ... at few versions: let every index offer every version.
        command += ["--index-strategy", "unsafe-best-match"]
    return command


def uv_compile(inputs: CompileInputs, work_dir: Path, timeout: float | None = None) -> dict[str, Any]:
    """Resolve with uv; the parsed pylock.toml it wrote, or UvFailure (UvTimeout after ``timeout`` seconds)."""
    requirements, constraints = write_inputs(inputs, work_dir)
    output = work_dir / "pylock.toml"
    command = uv_compile_command(inputs, requirements, constraints, output)
    python = inputs.target.python
    try:
        with UV_PYTHONS.run_for(python, uv_bin):
            env = UV_PYTHONS.env(python)
            completed = subprocess.run(command, capture_output=True, text=True, env=env, check=False, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise UvTimeout(f"uv pip compile ran past {timeout:.0f} s") from None
    if completed.returncode != 0:
        raise UvFailure(completed.stderr)
    return tomllib.loads(output.read_text())


def compile_inputs(plan: Plan, target: Target) -> CompileInputs:
    """What uv is given for the plan as it stands (the benchmark gives raw uv exactly this)."""
    return CompileInputs(
        plan.requirement_lines(),
        plan.constraint_lines(),
        target,
        list(plan.extra_index_urls),
        list(plan.build_constraints),
        sorted(plan.excludes),
    )


def run_uv(plan: Plan, target: Target, work_dir: Path, timeout: float | None = None) -> dict[str, Any]:
    """One uv resolution of the plan as it stands (counted on the plan); UvFailure when uv finds none."""
    plan.uv_runs += 1
    return uv_compile(compile_inputs(plan, target), work_dir, timeout)
