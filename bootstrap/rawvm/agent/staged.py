"""The agent's install files staged for a launch: its wheel, its hashed requirements and, when the machine's
Python is known, its whole venv as one archive (``rawvm.agent.runtime``).

Every provider that boots from user-data stages the same files and hands their URLs and sha256 to
``render_user_data``; the machine checks each before it uses it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from rawvm.agent.requirements import REQUIREMENTS_NAME, requirements_path
from rawvm.agent.runtime import RuntimeTarget, build_agent_runtime
from rawvm.errors import RawvmError, UsageError
from rawvm.files import sha256_file

Stage = Callable[[Sequence[tuple[str, Path]]], dict[str, str]]


@dataclass(frozen=True)
class StagedAgent:
    """Where a machine fetches the agent wheel and its requirements, and the sha256 each must have."""

    wheel_url: str
    wheel_sha256: str
    requirements_url: str
    requirements_sha256: str
    runtime: StagedRuntime | None = None
    """The agent's venv as one archive, for machines whose Python is ``runtime.target.python``."""


@dataclass(frozen=True)
class StagedRuntime:
    """Where a machine fetches the agent's venv archive, its sha256 and the machine it was built for."""

    url: str
    sha256: str
    target: RuntimeTarget


def stage_agent(
    wheel: Path, stage: Stage, runtime: RuntimeTarget | None = None, say: Callable[[str], None] = lambda _: None
) -> StagedAgent:
    """Stage ``wheel`` and the ``agent-requirements.txt`` beside it (both made by ``build_agent_wheel``) and, for
    a ``runtime`` target, the agent's venv archive for it. An archive that cannot be built is said and left out:
    the machines then make the venv themselves, more slowly."""
    requirements = requirements_path(wheel)
    for path, what in ((wheel, "agent wheel"), (requirements, "agent requirements")):
        if not path.is_file():
            raise UsageError(f"{what} {path} not found; build it with rawvm.agent.wheel.build_agent_wheel")
    files = [(f"agent/{wheel.name}", wheel), (f"agent/{REQUIREMENTS_NAME}", requirements)]
    archive = None
    if runtime:
        try:
            archive = build_agent_runtime(wheel, runtime)
        except RawvmError as exc:
            say(f"the agent's venv for Python {runtime.python} could not be built here ({exc}); machines make it")
    if archive:
        files.append((f"agent/{archive.name}", archive))
    urls = stage(files)
    staged_runtime = None
    if archive and runtime:
        staged_runtime = StagedRuntime(urls[f"agent/{archive.name}"], sha256_file(archive), runtime)
    return StagedAgent(
        urls[files[0][0]], sha256_file(wheel), urls[files[1][0]], sha256_file(requirements), staged_runtime
    )
