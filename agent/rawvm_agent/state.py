"""The agent's lifecycle state, persisted atomically so a restarted agent resumes where it was.

Phases: booting → installing → ready → busy | idle → stopping → off, or failed. The state file keeps the
phase, when each phase began, the manifest that was installed (so a restart does not reinstall it) and
the idle clock (so a restart does not reset it: a crash-looping agent must still power the VM off).
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import asdict, dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any


class Phase(StrEnum):
    BOOTING = "booting"
    INSTALLING = "installing"
    READY = "ready"
    BUSY = "busy"
    IDLE = "idle"
    STOPPING = "stopping"
    OFF = "off"
    FAILED = "failed"


# Phases in which the environment is installed and tasks may run.
SERVING = frozenset({Phase.READY, Phase.BUSY, Phase.IDLE})


@dataclass
class InstallProgress:
    step: str = ""  # fetch | verify | uv (waits for the user-data's uv) | venv | sync | wheels | code | conda | done
    files_total: int = 0
    files_done: int = 0
    bytes_total: int = 0
    bytes_done: int = 0
    packages_total: int = 0
    packages_done: int = 0


@dataclass
class AgentState:
    phase: Phase = Phase.BOOTING
    phase_times: dict[str, float] = field(default_factory=dict)  # phase -> wall time it was last entered
    started_at: float = 0.0  # first boot of this machine's agent; max_lifetime counts from here
    restarts: int = 0
    boot_id: str = ""  # the kernel's boot id when last saved: same boot = the agent restarted, not the machine
    error: str = ""
    installed_manifest: str = ""  # manifest_sha256 of the bundle installed in state_dir ("-" for none)
    install: InstallProgress = field(default_factory=InstallProgress)
    idle: dict[str, Any] = field(default_factory=dict)  # IdlePolicy.to_state()
    last_keepalive: float | None = None
    stop_reason: str = ""

    def enter(self, phase: Phase, now: float) -> None:
        self.phase = phase
        self.phase_times[phase.value] = now

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["phase"] = self.phase.value
        return out

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> AgentState:
        """The state in ``raw``; TypeError or ValueError when any field has the wrong type (a damaged file must not
        crash the agent later, in arithmetic on a string: it is refused here, and the agent starts over)."""
        if not isinstance(raw, dict):
            raise TypeError(f"the state must be a JSON object, not {type(raw).__name__}")
        raw = dict(raw)
        install_raw = raw.pop("install", {})
        if not isinstance(install_raw, dict):
            raise TypeError("'install' must be an object")
        install = InstallProgress(**install_raw)
        _check_types(install, _INSTALL_TYPES)
        phase = Phase(raw.pop("phase", Phase.BOOTING.value))
        known = {k: v for k, v in raw.items() if k in cls.__dataclass_fields__}
        state = cls(phase=phase, install=install, **known)
        _check_types(state, _STATE_TYPES)
        if not all(isinstance(k, str) and _is_number(v) for k, v in state.phase_times.items()):
            raise TypeError("'phase_times' must map phase names to times")
        return state


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


_NUMBER = (int, float)
_STATE_TYPES: dict[str, tuple[type, ...]] = {
    "phase_times": (dict,),
    "started_at": _NUMBER,
    "restarts": (int,),
    "boot_id": (str,),
    "error": (str,),
    "installed_manifest": (str,),
    "idle": (dict,),
    "last_keepalive": (*_NUMBER, type(None)),
    "stop_reason": (str,),
}
_INSTALL_TYPES: dict[str, tuple[type, ...]] = {"step": (str,)} | {
    f: (int,) for f in ("files_total", "files_done", "bytes_total", "bytes_done", "packages_total", "packages_done")
}


def _check_types(obj: Any, types: dict[str, tuple[type, ...]]) -> None:
    for name, allowed in types.items():
        value = getattr(obj, name)
        if not isinstance(value, allowed) or (isinstance(value, bool) and bool not in allowed):
            raise TypeError(f"{name!r} has the wrong type ({type(value).__name__})")


def write_json_atomic(path: Path, data: Any, *, durable: bool = True) -> None:
    """Write JSON so readers (and a restarted agent) see the old file or the new one, never half of one.

    ``durable=False`` skips the fsync: still atomic for every reader and for a crash of the agent, but a power
    loss may leave the file missing or empty. For records written per task, whose loss costs at most a rerun
    (the sink holds the copy that lasts): an fsync each was most of a tiny task's cost (issue 22).
    """
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    except FileNotFoundError:  # the first file of its directory: make the directory once, not on every write
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            json.dump(data, fh, sort_keys=True, indent=1)
            if durable:
                fh.flush()
                os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class StateStore:
    """``state.json`` in the agent's state directory."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.damage = ""  # why the last load found the file unusable ("" when it was fine or absent)

    def load(self) -> AgentState | None:
        self.damage = ""
        try:
            raw = json.loads(self.path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return None
        except (ValueError, OSError) as exc:
            # A corrupt state file must not keep the agent from starting; start over (and reinstall).
            self.damage = f"{type(exc).__name__}: {exc}"
            return None
        try:
            return AgentState.from_dict(raw)
        except (TypeError, ValueError) as exc:
            self.damage = f"{type(exc).__name__}: {exc}"
            return None

    def save(self, state: AgentState) -> None:
        write_json_atomic(self.path, state.to_dict())
