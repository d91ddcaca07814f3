"""Builders for the agent-core tests: real wheels, real Contract 1 bundles, agent.toml files.

Everything here writes the real formats (wheel zip with RECORD, PEP 751 lock, rawvm-env.toml with sha256
chain, code.tar.gz) so the agent under test runs real uv against them, with no network.
"""

from __future__ import annotations

import base64
import hashlib
import io
import socket
import sys
import tarfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import tomli_w

TOKEN = "tok-3b1f9c0d7a2e4f5b8c6d"  # long and unique, so a leak is easy to grep for


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def python_xy() -> str:
    return f"{sys.version_info.major}.{sys.version_info.minor}"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def make_wheel(dest: Path, name: str, version: str, modules: dict[str, str], requires: tuple[str, ...] = ()) -> Path:
    """A pure-Python wheel ``name-version-py3-none-any.whl`` holding ``modules`` (path -> source)."""
    dist_info = f"{name}-{version}.dist-info"
    metadata = f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n"
    metadata += "".join(f"Requires-Dist: {r}\n" for r in requires)
    files = {
        **modules,
        f"{dist_info}/METADATA": metadata,
        f"{dist_info}/WHEEL": "Wheel-Version: 1.0\nGenerator: rawvm-tests\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    }
    record_lines = []
    for path, text in sorted(files.items()):
        digest = base64.urlsafe_b64encode(hashlib.sha256(text.encode()).digest()).rstrip(b"=").decode()
        record_lines.append(f"{path},sha256={digest},{len(text.encode())}")
    record_lines.append(f"{dist_info}/RECORD,,")
    files[f"{dist_info}/RECORD"] = "\n".join(record_lines) + "\n"
    dest.mkdir(parents=True, exist_ok=True)
    wheel = dest / f"{name}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        for path, text in sorted(files.items()):
            info = zipfile.ZipInfo(path, date_time=(1980, 1, 1, 0, 0, 0))
            zf.writestr(info, text)
    return wheel


def make_code_tar(path: Path, files: dict[str, str]) -> Path:
    """code.tar.gz as the resolver writes it: sorted members, mtime 0, uid/gid 0."""
    with tarfile.open(path, "w:gz") as tar:
        for name, text in sorted(files.items()):
            data = text.encode()
            info = tarfile.TarInfo(name)
            info.size, info.mtime, info.mode = len(data), 0, 0o644
            tar.addfile(info, io.BytesIO(data))
    return path


def pylock_for_wheel(wheel: Path, name: str, version: str, url: str | None = None) -> str:
    """A PEP 751 lock with one package whose only artifact is ``wheel`` (file:// URL by default)."""
    return tomli_w.dumps(
        {
            "lock-version": "1.0",
            "created-by": "rawvm-tests",
            "requires-python": ">=3.11",
            "packages": [
                {
                    "name": name,
                    "version": version,
                    "wheels": [
                        {
                            "url": url or wheel.resolve().as_uri(),
                            "size": wheel.stat().st_size,
                            "hashes": {"sha256": sha256(wheel)},
                        }
                    ],
                }
            ],
        }
    )


@dataclass
class Bundle:
    dir: Path
    manifest_sha256: str
    files: list[dict[str, str]]  # agent.toml [bundle] files: path, url, sha256

    def config(self) -> dict[str, Any]:
        return {"files": self.files, "manifest_sha256": self.manifest_sha256}


def write_bundle(directory: Path, files: dict[str, tuple[str, bytes]], python: str | None = None) -> Bundle:
    """Write ``files`` (path -> (kind, bytes)) and a rawvm-env.toml listing them; return agent.toml's view."""
    directory.mkdir(parents=True, exist_ok=True)
    entries = []
    for rel, (kind, data) in sorted(files.items()):
        target = directory / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data)
        entries.append({"path": rel, "sha256": hashlib.sha256(data).hexdigest(), "kind": kind})
    manifest = {
        "format": 1,
        "target": {
            "os": "linux",
            "arch": "x86_64",
            "glibc": "2.35",
            "python": python or python_xy(),
            "accelerator": "cpu",
            "cuda": "",
        },
        "source": {"python": "3.11.7", "platform": "linux_x86_64", "fingerprint": "sha256:" + "0" * 64},
        "install": {"index_url": "", "extra_index_urls": []},
        "files": entries,
    }
    (directory / "rawvm-env.toml").write_text(tomli_w.dumps(manifest))
    listed = [{"path": "rawvm-env.toml", "sha256": sha256(directory / "rawvm-env.toml")}, *entries]
    agent_files = [
        {"path": e["path"], "url": (directory / e["path"]).resolve().as_uri(), "sha256": e["sha256"]} for e in listed
    ]
    return Bundle(dir=directory, manifest_sha256=sha256(directory / "rawvm-env.toml"), files=agent_files)


def tiny_bundle(root: Path, exit_code: int = 7, python: str | None = None) -> Bundle:
    """The standard test bundle, no network needed.

    ``tinydep`` comes through the PEP 751 lock (a wheel by file:// URL with its sha256), ``tinyapp`` is a
    local wheel in ``wheels/``, and ``main.py`` in code.tar.gz imports both, prints, and exits ``exit_code``.
    ``python``: the manifest's ``[target] python`` (the tests' own version if not given).
    """
    artifacts = root / "artifacts"
    dep = make_wheel(artifacts, "tinydep", "1.0", {"tinydep/__init__.py": "GREETING = 'hello from tinydep'\n"})
    app = make_wheel(
        root / "built",
        "tinyapp",
        "0.1",
        {"tinyapp/__init__.py": "import tinydep\n\ndef greet():\n    return tinydep.GREETING + ' via tinyapp'\n"},
        requires=("tinydep",),
    )
    code = make_code_tar(
        root / "code.tar.gz",
        {
            "main.py": (
                "import os, sys\nimport tinyapp\n"
                "print(tinyapp.greet())\n"
                "print('venv', os.environ.get('VIRTUAL_ENV', ''))\n"
                "print('cwd', os.getcwd())\n"
                "print('oops', file=sys.stderr)\n"
                f"sys.exit({exit_code})\n"
            ),
            "data/input.txt": "42\n",
        },
    )
    return write_bundle(
        root / "bundle",
        {
            "pylock.toml": ("pylock", pylock_for_wheel(dep, "tinydep", "1.0").encode()),
            f"wheels/{app.name}": ("wheel", app.read_bytes()),
            "code.tar.gz": ("code", code.read_bytes()),
        },
        python,
    )


def agent_config(state_dir: Path, bundle: Bundle | None = None, **overrides: Any) -> dict[str, Any]:
    """An agent.toml dict for tests: loopback, random port, short intervals; ``overrides`` merged per section."""
    config: dict[str, Any] = {
        "cluster": "test",
        "machine_id": "m-test",
        "bind": "127.0.0.1",
        "port": free_port(),
        "token": TOKEN,
        "state_dir": str(state_dir),
        "idle": {"keepalive": "10m", "window": "1s", "cpu_threshold": 101.0, "poweroff_command": []},
        "telemetry": {"interval": "0.2s"},
    }
    if bundle is not None:
        config["bundle"] = bundle.config()
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(config.get(key), dict):
            config[key] = {**config[key], **value}
        else:
            config[key] = value
    return config


def write_config(path: Path, config: dict[str, Any]) -> Path:
    path.write_text(tomli_w.dumps(config))
    return path
