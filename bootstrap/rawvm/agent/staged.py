"""The agent's install files staged for a launch: its wheel and, beside it, its hashed requirements.

Every provider that boots from user-data stages the same two files and hands their URLs and sha256 to
``render_user_data``; the machine checks both before installing anything.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from rawvm.agent.requirements import REQUIREMENTS_NAME, requirements_path
from rawvm.errors import UsageError
from rawvm.files import sha256_file

Stage = Callable[[Sequence[tuple[str, Path]]], dict[str, str]]


@dataclass(frozen=True)
class StagedAgent:
    """Where a machine fetches the agent wheel and its requirements, and the sha256 each must have."""

    wheel_url: str
    wheel_sha256: str
    requirements_url: str
    requirements_sha256: str


def stage_agent(wheel: Path, stage: Stage) -> StagedAgent:
    """Stage ``wheel`` and the ``agent-requirements.txt`` beside it (both made by ``build_agent_wheel``)."""
    requirements = requirements_path(wheel)
    for path, what in ((wheel, "agent wheel"), (requirements, "agent requirements")):
        if not path.is_file():
            raise UsageError(f"{what} {path} not found; build it with rawvm.agent.wheel.build_agent_wheel")
    names = (f"agent/{wheel.name}", f"agent/{REQUIREMENTS_NAME}")
    urls = stage([(names[0], wheel), (names[1], requirements)])
    return StagedAgent(urls[names[0]], sha256_file(wheel), urls[names[1]], sha256_file(requirements))
