"""The bundle's download begun before the agent's imports (rawvm_agent/prefetch.py): the installer takes what came
whole with the right sha256 and downloads the rest itself."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from rawvm_agent.config import config_from_dict
from rawvm_agent.installer import Installer
from rawvm_agent.logs import Redactor
from rawvm_agent.prefetch import PREFETCH_DIR, BundlePrefetch
from rawvm_agent.state import InstallProgress

from tests.agent.core_helpers import agent_config, tiny_bundle
from tests.agent.test_install import run_in


def serve_bundle(directory: Path, hits: dict[str, int], tampered: str = "") -> web.Application:
    """The bundle's files over http, counting requests; ``tampered`` is served wrong the first time."""

    async def serve(request: web.Request) -> web.StreamResponse:
        name = request.match_info["name"]
        hits[name] = hits.get(name, 0) + 1
        if name == tampered and hits[name] == 1:
            return web.Response(body=b"not the file")
        return web.FileResponse(directory / name)

    app = web.Application()
    app.router.add_get("/b/{name:.+}", serve)
    return app


@pytest.mark.slow
async def test_the_installer_takes_the_prefetched_files_and_downloads_a_wrong_one_itself(tmp_path: Path) -> None:
    bundle = tiny_bundle(tmp_path / "src")
    hits: dict[str, int] = {}
    async with TestServer(serve_bundle(bundle.dir, hits, tampered="code.tar.gz")) as server:
        raw = agent_config(tmp_path / "state")
        files = [{**f, "url": str(server.make_url(f"/b/{f['path']}"))} for f in bundle.files]
        raw["bundle"] = {"files": files, "manifest_sha256": bundle.manifest_sha256}
        config = config_from_dict(raw)
        prefetch = BundlePrefetch.for_first_start(config)
        assert prefetch is not None
        installer = Installer(config, tmp_path / "state", InstallProgress(), Redactor(), prefetch=prefetch)
        env = await installer.install()
    assert run_in(env, "python", "main.py").returncode == 7
    # one request per file: the prefetch's; the tampered file came wrong, so the installer fetched it again
    assert hits == {f["path"]: 2 if f["path"] == "code.tar.gz" else 1 for f in bundle.files}
    assert not (tmp_path / "state" / PREFETCH_DIR).exists()
    size = sum((bundle.dir / f["path"]).stat().st_size for f in bundle.files)
    assert installer.progress.bytes_done == installer.progress.bytes_total == size


def test_only_a_first_start_with_http_files_prefetches(tmp_path: Path) -> None:
    state = tmp_path / "state"
    raw = agent_config(state)
    local = {"path": "rawvm-env.toml", "url": str(tmp_path / "rawvm-env.toml"), "sha256": "0" * 64}
    raw["bundle"] = {"files": [local], "manifest_sha256": "0" * 64}
    assert BundlePrefetch.for_first_start(config_from_dict(raw)) is None  # nothing to download: a local path
    raw["bundle"] = {"files": [{**local, "url": "http://127.0.0.1:9/rawvm-env.toml"}], "manifest_sha256": "0" * 64}
    state.mkdir()
    (state / "state.json").write_text(json.dumps({}))
    assert BundlePrefetch.for_first_start(config_from_dict(raw)) is None  # a restart: the agent knows its state


async def test_a_file_that_never_came_is_left_to_the_installer(tmp_path: Path) -> None:
    raw = agent_config(tmp_path / "state")
    entry = {"path": "rawvm-env.toml", "url": "http://127.0.0.1:9/rawvm-env.toml", "sha256": "0" * 64}
    raw["bundle"] = {"files": [entry], "manifest_sha256": "0" * 64}
    prefetch = BundlePrefetch.for_first_start(config_from_dict(raw))  # port 9: refused at once
    assert prefetch is not None
    assert not prefetch.take("rawvm-env.toml", "0" * 64, tmp_path / "dest", wait_s=30)
    assert not prefetch.take("not-in-the-bundle", "0" * 64, tmp_path / "dest")
    assert not (tmp_path / "dest").exists()
    prefetch.discard()
    assert not (tmp_path / "state" / PREFETCH_DIR).exists()
