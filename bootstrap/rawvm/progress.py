"""Per-machine progress while machines boot and install: a live rich table on a terminal, plain lines otherwise.

Progress goes to stderr so stdout carries only the task's output.
"""

from __future__ import annotations

import sys
import time
from typing import TYPE_CHECKING, Any, Protocol, TextIO

if TYPE_CHECKING:
    from rich.progress import TaskID


def say(message: str) -> None:
    """One of rawvm's own progress lines: on stderr, so a task's stdout stays the task's."""
    print(f"rawvm: {message}", file=sys.stderr, flush=True)


class MachineProgress(Protocol):
    def update(self, machine: str, phase: str, detail: str = "") -> None: ...

    def cost(self, text: str) -> None:
        """The running total, e.g. ``cost so far: $0.0123 at $0.3570/h``."""
        ...

    def close(self) -> None: ...


def install_detail(status: dict[str, Any]) -> str:
    """A short account of the agent's install progress, e.g. ``sync 12/40 packages``."""
    install = status.get("install") or {}
    step = str(install.get("step", ""))
    if install.get("packages_total"):
        return f"{step} {install.get('packages_done', 0)}/{install['packages_total']} packages".strip()
    if install.get("files_total"):
        mib = install.get("bytes_done", 0) / 2**20
        return f"{step} {install.get('files_done', 0)}/{install['files_total']} files, {mib:.1f} MiB".strip()
    return step


class PlainProgress:
    """One line per phase change: ``rawvm: m0 installing (3.1 s)``."""

    def __init__(self, stream: TextIO) -> None:
        self._stream = stream
        self._start = time.monotonic()
        self._phases: dict[str, str] = {}
        self._cost = ""

    def update(self, machine: str, phase: str, detail: str = "") -> None:
        if self._phases.get(machine) == phase:
            return
        self._phases[machine] = phase
        extra = f": {detail}" if detail and phase == "failed" else ""
        cost = f"; {self._cost}" if self._cost else ""
        print(f"rawvm: {machine} {phase}{extra} ({time.monotonic() - self._start:.1f} s{cost})", file=self._stream)
        self._stream.flush()

    def cost(self, text: str) -> None:
        self._cost = text  # said with the next phase change: a line per poll would drown the log

    def close(self) -> None:
        pass


class RichProgress:
    def __init__(self, stream: TextIO) -> None:
        # rich only where a terminal shows it: its import costs ~75 ms, a third of a warm `rawvm run --cluster`
        from rich.console import Console
        from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

        self._progress = Progress(
            SpinnerColumn(finished_text="[green]✓"),
            TextColumn("{task.description}"),
            TextColumn("[bold]{task.fields[phase]}"),
            TextColumn("[dim]{task.fields[detail]}"),
            TimeElapsedColumn(),
            console=Console(file=stream),
            transient=False,
        )
        self._tasks: dict[str, TaskID] = {}
        self._cost_task: TaskID | None = None
        self._progress.start()

    def cost(self, text: str) -> None:
        if self._cost_task is None:
            self._cost_task = self._progress.add_task("[dim]$", total=None, phase=text, detail="")
        self._progress.update(self._cost_task, phase=text)

    def update(self, machine: str, phase: str, detail: str = "") -> None:
        if machine not in self._tasks:
            self._tasks[machine] = self._progress.add_task(machine, total=1, phase=phase, detail=detail)
        done = phase in {"ready", "busy", "idle", "failed", "off"}
        style = {"failed": "[red]", "ready": "[green]"}.get(phase, "")
        self._progress.update(self._tasks[machine], phase=f"{style}{phase}", detail=detail, completed=1 if done else 0)

    def close(self) -> None:
        self._progress.stop()


def make_progress(stream: TextIO | None = None) -> MachineProgress:
    out = stream if stream is not None else sys.stderr
    return RichProgress(out) if out.isatty() else PlainProgress(out)
