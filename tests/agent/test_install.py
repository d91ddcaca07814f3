"""Bundle install: real uv against real bundles (Contract 1); sha256 chain checked before anything is used."""

from __future__ import annotations

import hashlib
import io
import platform
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from rawvm_agent import stdlib_venv
from rawvm_agent.config import config_from_dict
from rawvm_agent.environment import Environment
from rawvm_agent.install import BundleError, InstallError, parse_manifest, safe_relpath, unpack_code
from rawvm_agent.installer import Installer
from rawvm_agent.logs import Redactor
from rawvm_agent.state import InstallProgress

from tests.agent.core_helpers import agent_config, make_code_tar, python_xy, tiny_bundle, write_bundle


def installer(state_dir: Path, bundle_config: dict[str, object], **install: object) -> Installer:
    raw = agent_config(state_dir)
    raw["bundle"] = bundle_config
    if install:
        raw["install"] = install
    return Installer(config_from_dict(raw), state_dir, InstallProgress(), Redactor())


def run_in(env: Environment, *argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        argv, env=env.task_environ({"PATH": "/usr/bin:/bin"}), cwd=env.work_dir, capture_output=True, text=True
    )


@pytest.mark.slow
async def test_installs_lock_local_wheel_and_code_with_uv(tmp_path: Path) -> None:
    bundle = tiny_bundle(tmp_path / "src")
    inst = installer(tmp_path / "state", bundle.config())
    env = await inst.install()

    assert env.venv == tmp_path / "state" / "env"
    result = run_in(env, "python", "main.py")
    assert result.returncode == 7, result.stderr
    assert "hello from tinydep via tinyapp" in result.stdout
    assert f"venv {env.venv}" in result.stdout
    assert (env.work_dir / "data" / "input.txt").read_text() == "42\n"
    version = run_in(env, "python", "-c", "import sys; print(f'{sys.version_info[0]}.{sys.version_info[1]}')")
    assert version.stdout.strip() == python_xy()
    assert inst.progress.packages_total == 2 and inst.progress.packages_done == 2
    assert inst.progress.files_done == inst.progress.files_total == 4
    assert (
        inst.progress.bytes_done
        == inst.progress.bytes_total
        == sum((bundle.dir / f["path"]).stat().st_size for f in bundle.files)
    )
    assert inst.progress.step == "done"
    assert inst.is_installed(bundle.manifest_sha256)


@pytest.mark.slow
@pytest.mark.parametrize("asked", [False, True])
async def test_bytecode_is_compiled_at_install_only_when_asked(tmp_path: Path, asked: bool) -> None:
    bundle = tiny_bundle(tmp_path / "src")
    env = await installer(tmp_path / "state", bundle.config(), compile_bytecode=asked).install()
    compiled = list(env.venv.glob("lib/python*/site-packages/**/*.pyc"))
    assert bool(compiled) is asked


@pytest.mark.slow
async def test_fetches_bundle_over_http_and_retries(tmp_path: Path) -> None:
    bundle = tiny_bundle(tmp_path / "src")
    hits: dict[str, int] = {}

    async def serve(request: web.Request) -> web.StreamResponse:
        name = request.match_info["name"]
        hits[name] = hits.get(name, 0) + 1
        if name == "code.tar.gz" and hits[name] == 1:
            return web.Response(status=503)  # a transient failure: fetched again
        return web.FileResponse(bundle.dir / name)

    app = web.Application()
    app.router.add_get("/b/{name:.+}", serve)
    async with TestServer(app) as server:
        files = [{**f, "url": str(server.make_url(f"/b/{f['path']}?X-Amz-Signature=abc"))} for f in bundle.files]
        inst = installer(tmp_path / "state", {"files": files, "manifest_sha256": bundle.manifest_sha256})
        env = await inst.install()
    assert run_in(env, "python", "main.py").returncode == 7
    assert hits["code.tar.gz"] == 2
    size = sum((bundle.dir / f["path"]).stat().st_size for f in bundle.files)
    assert inst.progress.bytes_done == inst.progress.bytes_total == size


async def test_http_error_names_the_url_without_its_query(tmp_path: Path) -> None:
    bundle = tiny_bundle(tmp_path / "src")
    app = web.Application()
    async with TestServer(app) as server:
        files = [
            {**f, "url": str(server.make_url(f"/missing/{f['path']}?X-Amz-Signature=s3cr3t"))} for f in bundle.files
        ]
        with pytest.raises(InstallError) as info:
            await installer(tmp_path / "state", {"files": files, "manifest_sha256": bundle.manifest_sha256}).install()
    assert "404" in str(info.value) and "rawvm-env.toml" in str(info.value)
    assert "s3cr3t" not in str(info.value)


@pytest.mark.parametrize("what", ["manifest", "wheel", "code"])
async def test_sha256_mismatch_refuses_and_installs_nothing(tmp_path: Path, what: str) -> None:
    bundle = tiny_bundle(tmp_path / "src")
    if what == "manifest":
        (bundle.dir / "rawvm-env.toml").write_text((bundle.dir / "rawvm-env.toml").read_text() + "\n# tampered\n")
    elif what == "wheel":
        wheel = next((bundle.dir / "wheels").iterdir())
        wheel.write_bytes(wheel.read_bytes() + b"tampered")
    else:
        make_code_tar(bundle.dir / "code.tar.gz", {"main.py": "print('evil')\n"})
    state = tmp_path / "state"
    inst = installer(state, bundle.config())
    with pytest.raises(BundleError, match="sha256"):
        await inst.install()
    assert not (state / "env").exists()
    assert not (state / "work").exists()
    assert not (state / "bundle").exists() and not (state / "bundle.partial").exists()


async def test_manifest_and_agent_toml_must_agree_on_every_file(tmp_path: Path) -> None:
    bundle = tiny_bundle(tmp_path / "src")
    extra = tmp_path / "extra.whl"
    extra.write_bytes(b"not listed")
    files = [*bundle.files, {"path": "wheels/extra.whl", "url": extra.as_uri(), "sha256": ""}]
    with pytest.raises(BundleError, match="not listed"):
        await installer(tmp_path / "s1", {"files": files, "manifest_sha256": bundle.manifest_sha256}).install()
    missing = [f for f in bundle.files if f["path"] != "code.tar.gz"]
    with pytest.raises(BundleError, match="no URL"):
        await installer(tmp_path / "s2", {"files": missing, "manifest_sha256": bundle.manifest_sha256}).install()
    with pytest.raises(BundleError, match="manifest_sha256"):
        await installer(tmp_path / "s3", {"files": bundle.files, "manifest_sha256": ""}).install()


async def test_empty_bundle_means_the_agents_own_python(tmp_path: Path) -> None:
    env = await installer(tmp_path / "state", {}).install()
    assert env.venv is None
    assert env.work_dir.is_dir()
    assert not (tmp_path / "state" / "env").exists()


@pytest.mark.slow
async def test_uv_failure_is_one_line_and_leaves_no_env(tmp_path: Path) -> None:
    # A lock whose artifact is missing (and whose hash is wrong): uv itself fails; the agent reports one line.
    bundle = write_bundle(
        tmp_path / "bundle",
        {
            "pylock.toml": (
                "pylock",
                (
                    'lock-version = "1.0"\ncreated-by = "t"\n[[packages]]\nname = "nosuch"\nversion = "1.0"\n'
                    f'wheels = [{{ url = "{(tmp_path / "nosuch-1.0-py3-none-any.whl").as_uri()}", '
                    f'hashes = {{ sha256 = "{"0" * 64}" }} }}]\n'
                ).encode(),
            )
        },
    )
    inst = installer(tmp_path / "state", bundle.config())
    with pytest.raises(InstallError) as info:
        await inst.install()
    assert "\n" not in str(info.value) and "uv pip sync failed" in str(info.value)
    assert not (tmp_path / "state" / "env").exists()
    assert "nosuch" in (tmp_path / "state" / "install.log").read_text()


@pytest.mark.slow
async def test_the_install_waits_for_uv_the_user_data_is_still_fetching(tmp_path: Path) -> None:
    """On a VM the agent starts while the user-data still downloads uv: the bundle is fetched and checked, then
    the install waits (step ``uv``) until uv appears, atomically, where agent.toml says, and goes on with it."""
    import asyncio
    import shutil

    bundle = tiny_bundle(tmp_path / "src")
    uv = tmp_path / "bin" / "uv"
    steps: list[str] = []
    inst = installer(tmp_path / "state", bundle.config(), uv=str(uv), uv_wait="1m")
    inst.on_progress = lambda: steps.append(inst.progress.step)
    install = asyncio.create_task(inst.install())
    while "uv" not in steps:
        assert not install.done(), install.exception()
        await asyncio.sleep(0.05)
    assert inst.progress.files_done == inst.progress.files_total  # the bundle came first
    await asyncio.sleep(0.3)
    assert not install.done()  # still waiting for uv
    assert (tmp_path / "state" / "env" / "pyvenv.cfg").is_file()  # the venv did not wait for it
    real_uv = shutil.which("uv")
    assert real_uv
    uv.parent.mkdir()
    uv.with_name("uv.part").symlink_to(real_uv)
    uv.with_name("uv.part").rename(uv)  # as the user-data's unpacking does: complete or absent
    env = await asyncio.wait_for(install, 120)
    assert run_in(env, "python", "main.py").returncode == 7
    assert steps.index("uv") < steps.index("venv")


@pytest.mark.slow
async def test_the_agents_own_interpreter_gets_the_stdlib_venv_any_other_uvs(tmp_path: Path) -> None:
    """The bundle's Python is the agent's own version: the venv comes from the standard library (no ``uv venv``
    in the install log, the agent's real interpreter as its home); a Python given by path (as a conda prefix's
    is) goes to ``uv venv``. Both installs run the task."""
    ours = installer(tmp_path / "ours", tiny_bundle(tmp_path / "src").config())
    env = await ours.install()
    assert run_in(env, "python", "main.py").returncode == 7
    assert "$ uv venv" not in (tmp_path / "ours" / "install.log").read_text()
    cfg = (tmp_path / "ours" / "env" / "pyvenv.cfg").read_text()
    assert f"home = {Path(sys._base_executable).parent}" in cfg  # type: ignore[attr-defined]

    other = installer(tmp_path / "other", tiny_bundle(tmp_path / "src2", python=sys.executable).config())
    env = await other.install()
    assert run_in(env, "python", "main.py").returncode == 7
    assert "$ uv venv --python" in (tmp_path / "other" / "install.log").read_text()


async def test_a_stdlib_venv_that_fails_falls_back_to_uv_venv(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    def broken(path: Path) -> None:
        raise PermissionError(13, "Permission denied", str(path / "bin" / "activate"))

    monkeypatch.setattr(stdlib_venv, "make", broken)
    inst = installer(tmp_path / "state", tiny_bundle(tmp_path / "src").config())
    with caplog.at_level("WARNING", logger="rawvm_agent.install"):
        env = await inst.install()
    assert run_in(env, "python", "main.py").returncode == 7
    assert "$ uv venv" in (tmp_path / "state" / "install.log").read_text()
    [warning] = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert "standard library's venv failed" in warning and "making it with uv" in warning


@pytest.mark.parametrize(
    ("python", "served"),
    [
        ("", True),
        (python_xy(), True),
        (platform.python_version(), True),
        ("3.9", False),
        ("/opt/conda/bin/python", False),
    ],
)
def test_which_python_the_stdlib_venv_serves(python: str, served: bool) -> None:
    assert stdlib_venv.serves(python) is served


async def test_a_uv_that_never_comes_fails_the_install_in_one_line(tmp_path: Path) -> None:
    bundle = tiny_bundle(tmp_path / "src")
    inst = installer(tmp_path / "state", bundle.config(), uv=str(tmp_path / "no-uv"), uv_wait=1.5)
    started = time.monotonic()
    with pytest.raises(InstallError, match=r"did not appear in \[install\] uv_wait = 1.5 s"):
        await inst.install()
    assert time.monotonic() - started < 2.9  # waited once (1.5 s), not once per caller (3 s)
    assert not (tmp_path / "state" / "env").exists()


def test_uv_environment_carries_tls_settings(tmp_path: Path) -> None:
    ca = tmp_path / "proxy-ca.pem"
    ca.write_text("-----BEGIN CERTIFICATE-----\nMIIBfake\n-----END CERTIFICATE-----\n")
    inst = installer(tmp_path / "state", {}, ca_certs=[str(ca)], native_tls=True)
    (tmp_path / "state").mkdir()
    env = inst.uv_environ()
    assert env["UV_NATIVE_TLS"] == "1"
    bundle_text = Path(env["SSL_CERT_FILE"]).read_text()
    assert ca.read_text() in bundle_text
    assert bundle_text.count("BEGIN CERTIFICATE") > 1  # the system roots stay: SSL_CERT_FILE replaces them


def test_index_settings_reach_uv(tmp_path: Path) -> None:
    inst = installer(
        tmp_path / "state",
        {},
        index_url="https://mirror.example/simple",
        extra_index_urls=["https://download.pytorch.org/whl/cu128"],
    )
    manifest = parse_manifest('format = 1\n[install]\nindex_url = "https://other/simple"\n')
    assert inst._index_args(manifest) == [
        "--index-url",
        "https://mirror.example/simple",
        "--extra-index-url",
        "https://download.pytorch.org/whl/cu128",
    ]
    plain = installer(tmp_path / "s2", {})
    assert plain._index_args(manifest) == ["--index-url", "https://other/simple"]


def test_the_bundles_build_constraints_reach_uv(tmp_path: Path) -> None:
    (tmp_path / "state").mkdir()
    inst = installer(tmp_path / "state", {})
    manifest = parse_manifest('format = 1\n[install]\nbuild_constraints = ["setuptools<82"]\n')
    args = inst._index_args(manifest)
    assert args[:1] == ["--build-constraints"] and Path(args[1]).read_text() == "setuptools<82\n"
    assert installer(tmp_path / "s2", {})._index_args(parse_manifest("format = 1\n")) == []


@pytest.mark.parametrize("bad", ["/etc/passwd", "../up", "a/../../b", "", "a//b"])
def test_bundle_paths_must_be_plain_relative(bad: str) -> None:
    with pytest.raises(BundleError):
        safe_relpath(bad)


def test_manifest_rejects_unknown_format_and_kind() -> None:
    with pytest.raises(BundleError, match="format"):
        parse_manifest("format = 2\n")
    with pytest.raises(BundleError, match="kind"):
        parse_manifest('format = 1\n[[files]]\npath = "x"\nsha256 = "0"\nkind = "exe"\n')


def test_code_archive_cannot_escape_the_work_dir(tmp_path: Path) -> None:
    archive = tmp_path / "code.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        member = tarfile.TarInfo("../escape.txt")
        member.size = 4
        tar.addfile(member, io.BytesIO(b"evil"))
    work = tmp_path / "work"
    work.mkdir()
    with pytest.raises(InstallError, match="outside"):
        unpack_code(archive, work)
    assert not (tmp_path / "escape.txt").exists()
    assert list(work.rglob("*")) == []


def test_code_archive_absolute_member_lands_inside(tmp_path: Path) -> None:
    archive = tmp_path / "code.tar.gz"
    target = tmp_path / "outside.txt"
    with tarfile.open(archive, "w:gz") as tar:
        member = tarfile.TarInfo(str(target))
        member.size = 4
        tar.addfile(member, io.BytesIO(b"evil"))
    work = tmp_path / "work"
    work.mkdir()
    unpack_code(archive, work)
    assert not target.exists()
    assert (work / str(target).lstrip("/")).read_bytes() == b"evil"


def test_code_archive_symlink_out_is_refused(tmp_path: Path) -> None:
    archive = tmp_path / "code.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        link = tarfile.TarInfo("link")
        link.type, link.linkname = tarfile.SYMTYPE, "/etc"
        tar.addfile(link)
    work = tmp_path / "work"
    work.mkdir()
    with pytest.raises(InstallError):
        unpack_code(archive, work)


@pytest.mark.network
@pytest.mark.slow
async def test_real_pypi_lock_installs(tmp_path: Path) -> None:
    """A lock made by uv itself from PyPI (one tiny pure-Python package), synced by the agent."""
    (tmp_path / "req.in").write_text("iniconfig==2.0.0\n")
    subprocess.run(
        ["uv", "pip", "compile", "req.in", "-o", "pylock.toml", "--python-version", python_xy(), "-q"],
        cwd=tmp_path,
        check=True,
    )
    lock = (tmp_path / "pylock.toml").read_bytes()
    assert hashlib.sha256(lock).hexdigest()
    bundle = write_bundle(tmp_path / "bundle", {"pylock.toml": ("pylock", lock)})
    env = await installer(tmp_path / "state", bundle.config()).install()
    result = run_in(env, "python", "-c", "import iniconfig; print(iniconfig.__file__)")
    assert result.returncode == 0 and str(env.venv) in result.stdout


def _archive_with(tmp_path: Path, member: tarfile.TarInfo, data: bytes = b"") -> Path:
    archive = tmp_path / "code.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        ok = tarfile.TarInfo("pkg/ok.py")
        ok.size = 2
        tar.addfile(ok, io.BytesIO(b"42"))
        member.size = len(data)
        tar.addfile(member, io.BytesIO(data) if data else None)
    return archive


def _symlink(name: str, target: str) -> tarfile.TarInfo:
    link = tarfile.TarInfo(name)
    link.type, link.linkname = tarfile.SYMTYPE, target
    return link


@pytest.mark.parametrize(
    "member",
    [tarfile.TarInfo("../escape.txt"), tarfile.TarInfo("/abs/escape.txt"), _symlink("link", "/etc")],
    ids=["dotdot", "absolute", "symlink"],
)
def test_code_archive_rules_hold_without_tarfile_filters(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, member: tarfile.TarInfo
) -> None:
    """Debian 12's Python 3.11.2 (the VM's) has no tarfile extraction filters: our own member check applies."""
    monkeypatch.delattr(tarfile, "data_filter")
    archive = _archive_with(tmp_path, member, b"evil" if member.isfile() else b"")
    work = tmp_path / "work"
    work.mkdir()
    with pytest.raises(InstallError):
        unpack_code(archive, work)
    assert list(work.rglob("*")) == []  # refused before anything was written
    assert not (tmp_path / "escape.txt").exists()


def test_code_archive_unpacks_without_tarfile_filters(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delattr(tarfile, "data_filter")
    member = tarfile.TarInfo("pkg/setuid.py")
    member.mode = 0o4755
    archive = _archive_with(tmp_path, member, b"x = 1\n")
    work = tmp_path / "work"
    work.mkdir()
    unpack_code(archive, work)
    assert (work / "pkg" / "ok.py").read_bytes() == b"42"
    assert (work / "pkg" / "setuid.py").stat().st_mode & 0o7777 == 0o755


def test_unpacked_code_is_new_now_not_1970(tmp_path: Path) -> None:
    """The archive stores mtime 0 for equal bytes; unpacked, the files carry the time they arrived."""
    import io
    import tarfile
    import time

    from rawvm_agent.install import unpack_code

    archive = tmp_path / "code.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        info = tarfile.TarInfo("pkg/a.py")
        data = b"print(1)\n"
        info.size, info.mtime = len(data), 0
        tar.addfile(info, io.BytesIO(data))
    before = time.time()
    unpack_code(archive, tmp_path / "work")
    assert (tmp_path / "work" / "pkg" / "a.py").stat().st_mtime >= before - 1
