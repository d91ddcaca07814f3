"""Install the environment bundle (Contract 1): fetch, verify, then fill the venv with uv.

Order matters for safety: every file is fetched into a staging directory and checked against the sha256
chain (agent.toml's ``manifest_sha256`` → ``rawvm-env.toml`` → each file) before anything is installed.
A mismatch raises ``BundleError`` and leaves no venv and no work dir behind.

Layout under the state dir: ``bundle/`` (verified files), ``env/`` (the venv), ``work/`` (the code).
The bundle's format and rules live in install.py, downloads in fetch.py, the conda part in conda_install.py,
the venv itself in stdlib_venv.py (uv's ``uv venv`` for an interpreter that is not the agent's own).
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import ssl
import tomllib
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import aiohttp

from rawvm_agent import stdlib_venv
from rawvm_agent.conda_install import install_conda_lock
from rawvm_agent.config import AgentConfig, BundleFile
from rawvm_agent.environment import Environment
from rawvm_agent.fetch import fetch, ssl_context
from rawvm_agent.install import (
    MANIFEST,
    BundleError,
    InstallError,
    Manifest,
    ManifestFile,
    parse_manifest,
    safe_relpath,
    sha256_file,
    unpack_code,
)
from rawvm_agent.logs import Redactor
from rawvm_agent.prefetch import BundlePrefetch
from rawvm_agent.state import InstallProgress

log = logging.getLogger("rawvm_agent.install")


class Installer:
    """Installs ``config.bundle`` under ``state_dir``; reports progress through ``progress``/``on_progress``."""

    def __init__(
        self,
        config: AgentConfig,
        state_dir: Path,
        progress: InstallProgress,
        redactor: Redactor,
        on_progress: Callable[[], None] = lambda: None,
        *,
        prefetch: BundlePrefetch | None = None,
    ) -> None:
        self.config = config
        self.state_dir = state_dir
        self.prefetch = prefetch  # the bundle's files, if their download began before the agent's imports
        self.progress = progress
        self.redactor = redactor
        self.on_progress = on_progress
        self.bundle_dir = state_dir / "bundle"
        self.venv = state_dir / "env"
        self.work_dir = state_dir / "work"
        self.conda_prefix = state_dir / "conda"
        self.install_log = state_dir / "install.log"
        self._early_venv: asyncio.Task[None] | None = None  # the venv made while the bundle downloads
        self._uv_deadline: float | None = None  # loop time until which a missing uv is waited for

    def no_environment(self) -> Environment:
        self.work_dir.mkdir(parents=True, exist_ok=True)
        return Environment(venv=None, work_dir=self.work_dir)

    def existing(self) -> Environment:
        """The environment a previous run of the agent installed (resume without reinstalling)."""
        if not self.config.bundle.files:
            return self.no_environment()
        conda = self.conda_prefix if self.conda_prefix.is_dir() else None
        return Environment(venv=self.venv, work_dir=self.work_dir, conda_prefix=conda)

    def is_installed(self, installed_manifest: str) -> bool:
        if not self.config.bundle.files:
            return installed_manifest == "-"
        return (
            installed_manifest == self.config.bundle.manifest_sha256
            and (self.venv / "bin" / "python").exists()
            and self.work_dir.is_dir()
        )

    async def install(self) -> Environment:
        if not self.config.bundle.files:
            return self.no_environment()
        self._early_venv = None
        try:
            try:
                manifest = await self._fetch_and_verify()
            finally:
                if self.prefetch is not None:  # what it fetched was taken or is of no use: nothing waits on it
                    await asyncio.to_thread(self.prefetch.discard)
                    self.prefetch = None
            return await self._install_verified(manifest)
        except BaseException:
            if self._early_venv is not None:  # let its uv finish: a cancelled task would leave uv running
                await asyncio.gather(self._early_venv, return_exceptions=True)
            # A half-built environment must not look installed to the next attempt or to tasks.
            for path in (self.venv, self.work_dir, self.conda_prefix):
                shutil.rmtree(path, ignore_errors=True)
            raise

    # -- fetch and verify -------------------------------------------------------------------------------

    async def _fetch_and_verify(self) -> Manifest:
        bundle = self.config.bundle
        if not bundle.manifest_sha256:
            raise BundleError("agent.toml [bundle] has files but no manifest_sha256; refusing an unverified bundle")
        by_path = {f.path: f for f in bundle.files}
        if MANIFEST not in by_path:
            raise BundleError(f"agent.toml [bundle] lists no {MANIFEST}; cannot verify the bundle")
        staging = self.state_dir / "bundle.partial"
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
        try:
            manifest = await self._fetch_all(staging, by_path)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        shutil.rmtree(self.bundle_dir, ignore_errors=True)
        staging.rename(self.bundle_dir)
        return manifest

    async def _fetch_all(self, staging: Path, by_path: dict[str, BundleFile]) -> Manifest:
        self._step("fetch")
        self.progress.files_total = len(by_path)
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=30, sock_read=120)
        connector = aiohttp.TCPConnector(ssl=ssl_context(self.config.install), limit=4)
        async with aiohttp.ClientSession(timeout=timeout, connector=connector) as session:
            manifest_entry = by_path[MANIFEST]
            await self._fetch_verified(session, manifest_entry, staging, self.config.bundle.manifest_sha256)
            manifest = parse_manifest((staging / MANIFEST).read_text(encoding="utf-8"))
            listed = {f.path for f in manifest.files}
            unlisted = sorted(set(by_path) - listed - {MANIFEST})
            if unlisted:
                raise BundleError(f"bundle file {unlisted[0]!r} is not listed in {MANIFEST}; refusing it")
            missing = sorted(listed - set(by_path))
            if missing:
                raise BundleError(f"{MANIFEST} lists {missing[0]!r} but agent.toml gives no URL for it")
            if not manifest.of_kind("conda-lock"):
                # The venv needs only the manifest's Python (a conda one comes later): make it while the rest
                # downloads. It installs nothing from the bundle, so it does not wait for the files' checks.
                self._early_venv = asyncio.create_task(self._make_venv(manifest.python))
            # Let every fetch finish (or fail) before cleaning up: none may write into a removed staging dir.
            results = await asyncio.gather(
                *(self._fetch_verified(session, by_path[f.path], staging, f.sha256) for f in manifest.files),
                return_exceptions=True,
            )
            for result in results:
                if isinstance(result, BaseException):
                    raise result
        return manifest

    async def _fetch_verified(
        self, session: aiohttp.ClientSession, entry: BundleFile, staging: Path, expected: str
    ) -> None:
        dest = staging / safe_relpath(entry.path)
        dest.parent.mkdir(parents=True, exist_ok=True)
        if self.prefetch is not None and await asyncio.to_thread(self.prefetch.take, entry.path, expected, dest):
            size = dest.stat().st_size
            self._add_size(size)
            self._add_bytes(size)
            actual = expected.lower()  # take() hashed it as it came
        else:
            actual = await fetch(session, entry.url, dest, self._add_bytes, self._add_size)
        for want, source in ((expected, MANIFEST), (entry.sha256, "agent.toml")):
            if want and actual != want.lower():
                raise BundleError(
                    f"bundle file {entry.path!r} has sha256 {actual[:16]}…, {source} says {want[:16]}…; "
                    "refusing the bundle (re-stage it)"
                )
        self.progress.files_done += 1
        self.on_progress()

    def _add_bytes(self, n: int) -> None:
        self.progress.bytes_done += n
        self.progress.bytes_total = max(self.progress.bytes_total, self.progress.bytes_done)

    def _add_size(self, n: int) -> None:
        self.progress.bytes_total += n

    # -- install ----------------------------------------------------------------------------------------

    async def _install_verified(self, manifest: Manifest) -> Environment:
        if shutil.which(self.config.install.uv) is None:
            self._step("uv")  # the bundle is here before uv, which the user-data fetches while the agent starts
            await self._wait_for_uv()  # a uv still missing fails at its first run, with its own message
        for path in (self.work_dir, self.conda_prefix):  # the venv: _make_venv starts afresh
            shutil.rmtree(path, ignore_errors=True)
        pylocks = manifest.of_kind("pylock")
        local = manifest.of_kind("wheel") + manifest.of_kind("sdist")
        self.progress.packages_total = sum(_pylock_package_count(self.bundle_dir / f.path) for f in pylocks) + len(
            local
        )
        conda_prefix = None
        conda_locks = manifest.of_kind("conda-lock")
        if conda_locks:
            self._step("conda")
            conda_prefix = await self._install_conda(self.bundle_dir / conda_locks[0].path)

        self._step("venv")
        if self._early_venv is not None:
            await self._early_venv
        else:
            await self._make_venv(str(conda_prefix / "bin" / "python") if conda_prefix else manifest.python)

        for lock in pylocks:
            self._step("sync")
            # uv reads PEP 751 locks natively when the file is named pylock.toml / pylock.*.toml.
            await self._uv(
                ["pip", "sync", str(self.bundle_dir / lock.path), *self._target(), *self._index_args(manifest)]
            )
            self.progress.packages_done += _pylock_package_count(self.bundle_dir / lock.path)
            self.on_progress()

        if local:
            self._step("wheels")
            # Their dependencies are in the lock already; --no-deps keeps the sync's exact versions.
            paths = [str(self.bundle_dir / f.path) for f in local]
            await self._uv(["pip", "install", "--no-deps", *paths, *self._target(), *self._index_args(manifest)])
            self.progress.packages_done += len(local)
            self.on_progress()

        self._step("code")
        self.work_dir.mkdir(parents=True)
        for code in manifest.of_kind("code"):
            await asyncio.to_thread(unpack_code, self.bundle_dir / code.path, self.work_dir)
        self._step("done")
        return Environment(venv=self.venv, work_dir=self.work_dir, conda_prefix=conda_prefix)

    async def update_lock(self, staged: Path) -> int:
        """Install the difference a newer lock makes, before the next task: ``staged`` holds a bundle's manifest
        and its lock and local packages (not its code, which travels by ``code_sync``); every file is checked
        against the manifest, ``uv pip sync`` changes only what differs, and the files then replace the bundle's.
        Over the authenticated API, as the first bundle came under agent.toml's hash. The packages locked."""
        manifest = parse_manifest((staged / MANIFEST).read_text(encoding="utf-8"))
        if manifest.of_kind("conda-lock"):
            raise InstallError("a conda environment cannot be updated in place: launch new machines")
        wanted = manifest.of_kind("pylock") + manifest.of_kind("wheel") + manifest.of_kind("sdist")
        for entry in wanted:
            path = staged / safe_relpath(entry.path)
            if not path.is_file() or sha256_file(path) != entry.sha256.lower():
                raise BundleError(f"bundle file {entry.path!r} is missing or does not match {MANIFEST}; refusing it")
        packages = 0
        for lock in manifest.of_kind("pylock"):
            await self._uv(["pip", "sync", str(staged / lock.path), *self._target(), *self._index_args(manifest)])
            packages += _pylock_package_count(staged / lock.path)
        if local := [str(staged / f.path) for f in manifest.of_kind("wheel") + manifest.of_kind("sdist")]:
            await self._uv(["pip", "install", "--no-deps", *local, *self._target(), *self._index_args(manifest)])
        for entry in [*wanted, ManifestFile(MANIFEST, "", "")]:
            target = self.bundle_dir / safe_relpath(entry.path)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(staged / entry.path, target)
        return packages

    async def _make_venv(self, python: str) -> None:
        shutil.rmtree(self.venv, ignore_errors=True)
        if stdlib_venv.serves(python):  # no wait for uv, no new process (see stdlib_venv)
            try:
                await asyncio.to_thread(stdlib_venv.make, self.venv)
                log.info("venv made by the standard library's venv")
                return
            except (OSError, ValueError) as exc:  # uv's way, then
                log.warning("the standard library's venv failed (%s); making it with uv", exc)
                shutil.rmtree(self.venv, ignore_errors=True)
        await self._uv(["venv", *(["--python", python] if python else []), str(self.venv)])

    async def _install_conda(self, lock: Path) -> Path:
        base_done, base_total = self.progress.packages_done, self.progress.packages_total

        def progress(done: int, total: int) -> None:  # called from rattler's threads; plain int stores
            self.progress.packages_done = base_done + done
            self.progress.packages_total = base_total + total

        await install_conda_lock(lock, self.conda_prefix, progress=progress, cache_dir=self.state_dir / "conda-cache")
        return self.conda_prefix

    def _target(self) -> list[str]:
        return ["--python", str(self.venv / "bin" / "python")]

    def _index_args(self, manifest: Manifest) -> list[str]:
        cfg = self.config.install
        index = cfg.index_url or manifest.index_url
        extras = cfg.extra_index_urls or manifest.extra_index_urls
        args = ["--index-url", index] if index else []
        for url in extras:
            args += ["--extra-index-url", url]
        if manifest.build_constraints:
            # Outside the verified bundle: the lines come from its manifest, whose sha256 was checked.
            path = self.state_dir / "build-constraints.txt"
            path.write_text("".join(f"{line}\n" for line in manifest.build_constraints))
            args += ["--build-constraints", str(path)]
        return args

    def uv_environ(self) -> dict[str, str]:
        cfg = self.config.install
        env = dict(os.environ)
        env["UV_NO_PROGRESS"] = "1"
        env["VIRTUAL_ENV"] = str(self.venv)
        if cfg.native_tls:
            env["UV_NATIVE_TLS"] = "1"
        if cfg.compile_bytecode:
            env["UV_COMPILE_BYTECODE"] = "1"
        if cfg.ca_certs:
            env["SSL_CERT_FILE"] = str(self._ca_bundle(cfg.ca_certs, env.get("SSL_CERT_FILE", "")))
        return env

    def _ca_bundle(self, extra: Sequence[str], current: str) -> Path:
        """The system roots plus the extra CAs, in one file: uv's SSL_CERT_FILE replaces, it does not add."""
        parts: list[str] = []
        for candidate in (current, ssl.get_default_verify_paths().cafile or "", "/etc/ssl/certs/ca-certificates.crt"):
            if candidate and Path(candidate).is_file():
                parts.append(Path(candidate).read_text(encoding="utf-8", errors="replace"))
                break
        for pem in extra:
            try:
                parts.append(Path(pem).read_text(encoding="utf-8"))
            except OSError as exc:
                raise InstallError(f"[install] ca_certs: cannot read {pem}: {exc.strerror}") from None
        out = self.state_dir / "ca-bundle.pem"
        out.write_text("\n".join(parts), encoding="utf-8")
        return out

    async def _wait_for_uv(self) -> bool:
        """True once ``[install] uv`` is found; waits for it to appear until ``[install] uv_wait`` seconds after the
        first wait began (one deadline for every caller: a uv that never comes is waited for once)."""
        loop = asyncio.get_running_loop()
        if self._uv_deadline is None:
            self._uv_deadline = loop.time() + self.config.install.uv_wait
        while shutil.which(self.config.install.uv) is None:
            if loop.time() >= self._uv_deadline:
                return False
            await asyncio.sleep(0.1)
        return True

    async def _uv(self, args: list[str]) -> None:
        cmd = [self.config.install.uv, *args]
        waited = self.config.install.uv_wait
        if not await self._wait_for_uv() and waited:
            raise InstallError(f"uv ({self.config.install.uv!r}) did not appear in [install] uv_wait = {waited:g} s")
        log.info("running %s", " ".join(cmd))
        try:
            proc = await asyncio.create_subprocess_exec(
                *cmd,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.STDOUT,
                env=self.uv_environ(),
                cwd=self.state_dir,
            )
        except FileNotFoundError:
            raise InstallError(f"uv not found ({self.config.install.uv!r}); set [install] uv in agent.toml") from None
        out, _ = await proc.communicate()
        text = self.redactor.redact(out.decode(errors="replace"))
        with self.install_log.open("a", encoding="utf-8") as fh:
            fh.write(f"$ {self.redactor.redact(' '.join(cmd))}\n{text}\n")
        if proc.returncode != 0:
            detail = uv_error_summary(text) or f"exit code {proc.returncode}"
            raise InstallError(f"uv {args[0]} {args[1] if args[0] == 'pip' else ''}".rstrip() + f" failed: {detail}")

    def _step(self, step: str) -> None:
        self.progress.step = step
        log.info("install: %s", step)
        self.on_progress()


def uv_error_summary(output: str) -> str:
    """One line from uv's output: what failed (its ``error:`` line) and the root cause (its last line), e.g.
    ``Failed to download `x @ http://...`: tcp connect error: Connection refused (os error 111)``."""
    lines = [line.strip() for line in output.splitlines() if line.strip()]
    if not lines:
        return ""
    what = next((line.removeprefix("error:").strip() for line in lines if line.startswith("error:")), "")
    cause = lines[-1].removeprefix("Caused by:").removeprefix("error:").strip()
    return (f"{what}: {cause}" if what and cause not in what else what or cause)[:500]


def _pylock_package_count(path: Path) -> int:
    try:
        raw: dict[str, Any] = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise InstallError(f"{path.name} is not a readable PEP 751 lock: {exc}") from None
    return len(raw.get("packages", []))
