"""Re-solve the conda part for the target's subdir with py-rattler and write it as conda-lock v1."""

from __future__ import annotations

import asyncio
import atexit
import concurrent.futures
import functools
import re
import time
from collections.abc import Coroutine, Sequence
from pathlib import Path
from typing import Any, TypeVar

import rattler
from rattler import BuildString, GenericVirtualPackage, MatchSpec, PackageName, RepoDataRecord, Version
from rattler import exceptions as rattler_errors

from rawvm_resolver.conda.inputs import CondaInput
from rawvm_resolver.conda.lockfile import render_conda_lock
from rawvm_resolver.errors import InputError, ResolverError
from rawvm_resolver.target import Target

DEFAULT_CHANNELS = ("conda-forge",)
# The oldest kernel a target image runs; packages rarely constrain __linux. pixi uses the same floor.
LINUX_KERNEL = "4.18"

_T = TypeVar("_T")
_CHANNEL_ERRORS = (
    rattler_errors.FetchRepoDataError,
    rattler_errors.GatewayError,
    rattler_errors.InvalidChannelError,
    rattler_errors.InvalidUrlError,
    rattler_errors.IoError,
)
_BAD_SPEC_ERRORS = (
    rattler_errors.InvalidMatchSpecError,
    rattler_errors.InvalidPackageNameError,
    rattler_errors.InvalidVersionError,
    rattler_errors.InvalidVersionSpecError,
)


def target_virtual_packages(target: Target) -> list[GenericVirtualPackage]:
    """What the target machine offers the solver: a Linux kernel, its glibc, its CPU arch, CUDA on GPU images."""
    packages = {
        "__unix": ("0", "0"),
        "__linux": (LINUX_KERNEL, "0"),
        "__glibc": (target.glibc, "0"),
        "__archspec": ("1", target.arch),  # generic arch: the image may run on any CPU of that family
    }
    if target.is_cuda:
        packages["__cuda"] = (target.cuda, "0")
    return [
        GenericVirtualPackage(PackageName(name), Version(version), BuildString(build))
        for name, (version, build) in sorted(packages.items())
    ]


def lock_conda(conda_input: CondaInput, target: Target, *, channels: Sequence[str] | None = None) -> bytes:
    """Solve ``conda_input`` for ``target.conda_subdir``; the conda-lock v1 file as bytes (deterministic).

    Channels: ``channels`` when given, else the input's own, else conda-forge. Only the conda packages are
    locked here; ``pip_requirements`` are resolved by uv into pylock.toml with the rest of the Python packages.
    """
    if not conda_input.specs:
        raise InputError("the conda part names no packages; add dependencies to environment.yml or drop it")
    chosen = tuple(map(channel_location, channels or conda_input.channels or DEFAULT_CHANNELS))
    specs = python_for_target(conda_input.specs, target.python)
    virtual = target_virtual_packages(target)
    records = _run(_solve(chosen, specs, target, virtual))
    return render_conda_lock(
        records,
        platform=target.conda_subdir,
        channels=chosen,
        specs=specs,
        virtual_packages=[str(package) for package in virtual],
    )


def python_for_target(specs: Sequence[str], python: str) -> tuple[str, ...]:
    """Python specs that name another X.Y (``--python 3.12`` over a 3.11 env) ask for the target's X.Y instead.

    The agent builds the venv from the conda env's python, so it must be the X.Y the pylock was resolved for.
    A spec naming the same X.Y (``python ==3.11.8`` for 3.11) is kept: the exact source version stays.
    """
    out = []
    for spec in specs:
        match = MatchSpec(spec)
        pinned = re.search(r"\d+\.\d+", str(match.version or ""))
        same = pinned is None or pinned.group() == python
        out.append(spec if str(match.name.normalized) != "python" or same else f"python {python}.*")
    return tuple(out)


# user:password@host, or anaconda.org's /t/<token>/ path segment.
_USERINFO = re.compile(r"(?<=://)[^/@]+@")
_TOKEN = re.compile(r"(?<=/t/)[^/]+(?=/)")


def channel_location(channel: str) -> str:
    """A local channel directory as the file:// URL rattler records; names and URLs stay as they are."""
    if _USERINFO.search(channel) or _TOKEN.search(channel):
        # Every package URL in the lock would carry them, and the lock is staged and kept: refuse, don't leak.
        shown = _TOKEN.sub("***", _USERINFO.sub("***@", channel))
        raise InputError(
            f"channel {shown} carries credentials, which would be written into "
            "conda-lock.yml; mirror the packages to a channel without credentials"
        )
    if channel.startswith(("/", "./", "../", "~")):
        return Path(channel).expanduser().resolve().as_uri()
    return channel


async def _solve(
    channels: Sequence[str], specs: Sequence[str], target: Target, virtual: list[GenericVirtualPackage]
) -> list[RepoDataRecord]:
    try:
        return await rattler.solve(
            list(channels),
            list(specs),
            platforms=[rattler.Subdir(target.conda_subdir), rattler.Subdir("noarch")],
            virtual_packages=virtual,
            channel_relations="disabled",  # solve against exactly the channels the user named
            constraints=[f"python {target.python}.*"],  # if python is in the env, it is the target's X.Y
        )
    except _BAD_SPEC_ERRORS as exc:
        raise InputError(f"invalid conda spec: {_one_line(exc)}; fix it in environment.yml") from None
    except _CHANNEL_ERRORS as exc:
        raise ResolverError(
            f"cannot read the conda channels {', '.join(channels)} for {target.conda_subdir}: {_one_line(exc)}; "
            "check the channel names or URLs and the network, or lock everything from PyPI with --pypi-only"
        ) from None
    except rattler_errors.SolverError as exc:
        raise ResolverError(
            f"the conda packages cannot be solved for {target.conda_subdir} from {', '.join(channels)}: "
            f"{_one_line(exc)}; relax the pins in environment.yml or add a channel that has them"
        ) from None


def _one_line(exc: BaseException) -> str:
    # rattler explains an unsolvable request as a tree; the CLI prints one line.
    text = re.sub(r"[│├└─]+", " ", str(exc))
    return re.sub(r"\s+", " ", text).strip().rstrip(".:")


def _settle_rattler_threads() -> None:
    # A known pyo3-async-runtimes race with no shutdown API yet (PyO3/pyo3-async-runtimes#40).
    # py-rattler's tokio worker threads drop their Python references just after a call returns. If the
    # interpreter is finalizing by then, CPython aborts the process (PyGILState_Release fatal error), so a
    # `rawvm lock` that succeeded could exit 134. atexit runs before finalization, while those threads can still
    # take the GIL: a short pause there lets them finish. Measured here: 8 of 40 runs aborted without, 0 of 100 with.
    time.sleep(0.1)


@functools.cache
def _settle_at_exit() -> None:
    atexit.register(_settle_rattler_threads)


def _run(coroutine: Coroutine[Any, Any, _T]) -> _T:
    """Run a coroutine to completion from sync code, also when the caller already runs an event loop."""
    _settle_at_exit()
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coroutine)
    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
        return pool.submit(asyncio.run, coroutine).result()
