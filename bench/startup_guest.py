"""The task bench/startup.py runs on the machine rawvm just set up: the same install, done raw (stdlib only).

It runs as the machine's first task, in the bundle's work directory, right after the agent installed the
environment, so it installs the very ``pylock.toml`` the agent installed (``../bundle/pylock.toml``), on the same
machine, the same disk and the same uv binary:

- ``uv``: ``uv venv`` + ``uv pip sync pylock.toml`` into a fresh venv (the agent's two commands), uv cache in
  ``--uv-cache`` (a fresh directory: cold; the one from an earlier run: warm);
- ``pip`` (unless ``--no-pip``): ``pip install --require-hashes -r requirements.txt`` of the same lock (exported
  with ``rawvm export``) into a fresh ``python -m venv`` with ``--no-cache-dir``; the venv's own creation
  (ensurepip) is not counted, in pip's favour.

Prints one ``RAWVM-BENCH-INSTALL {json}`` line: seconds per side and the lock's package count.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
import tomllib
from pathlib import Path

SYSTEM_CA = "/etc/ssl/certs/ca-certificates.crt"


def timed(command: list[str], env: dict[str, str]) -> float:
    start = time.monotonic()
    subprocess.run(command, env=env, check=True, stdout=subprocess.DEVNULL)
    return time.monotonic() - start


def agent_venv_variants(wheels: Path, scratch: Path, python: str, env: dict[str, str]) -> dict[str, float]:
    """The user-data's agent venv (uv venv, the hashed dependencies, the agent wheel) made in other ways, each
    from a fresh uv cache, on this machine: which settings cut the boot is measured here, not guessed."""
    (wheel,) = wheels.glob("rawvm_agent-*.whl")
    requirements = wheels / "agent-requirements.txt"
    pylock = Path("pylock.agent.toml").resolve()  # the same uv.lock's pins with their file URLs (shipped)
    digest = hashlib.sha256(wheel.read_bytes()).hexdigest()
    combined = scratch / "agent-all.txt"  # the dependencies and the agent wheel itself, hashed, in one file
    combined.write_text(f"{requirements.read_text()}\nrawvm-agent @ {wheel.as_uri()} --hash=sha256:{digest}\n")
    hashed = ["--require-hashes", "--only-binary", ":all:", "-r", str(requirements)]
    variants = {
        "agent: as today (2 installs, bytecode)": [
            ["--compile-bytecode", *hashed],
            ["--compile-bytecode", "--no-deps", str(wheel)],
        ],
        "agent: no bytecode": [hashed, ["--no-deps", str(wheel)]],
        "agent: pylock URLs, bytecode": [
            ["--compile-bytecode", "--only-binary", ":all:", "-r", str(pylock)],
            ["--compile-bytecode", "--no-deps", str(wheel)],
        ],
        "agent: one install, bytecode": [
            ["--compile-bytecode", "--require-hashes", "--only-binary", ":all:", "-r", str(combined)]
        ],
        "agent: copy link mode, bytecode": [
            ["--link-mode", "copy", "--compile-bytecode", *hashed],
            ["--link-mode", "copy", "--compile-bytecode", "--no-deps", str(wheel)],
        ],
    }
    found: dict[str, float] = {}
    for number, (label, installs) in enumerate(variants.items()):
        venv, cache = scratch / f"agent-{number}", scratch / f"agent-cache-{number}"
        variant_env = env | {"UV_CACHE_DIR": str(cache)}
        try:
            seconds = timed(["uv", "venv", "--quiet", "--python", python, str(venv)], variant_env)
            for install in installs:
                command = ["uv", "pip", "install", "--quiet", "--python", str(venv / "bin" / "python"), *install]
                seconds += timed(command, variant_env)
            found[label] = seconds
        except subprocess.CalledProcessError as exc:
            print(f"bench: {label} failed: {exc}", file=sys.stderr)
            found[label] = -1.0
        shutil.rmtree(venv, ignore_errors=True)
        shutil.rmtree(cache, ignore_errors=True)
    return found


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--uv-cache", required=True)
    parser.add_argument("--scratch", required=True)
    parser.add_argument("--python", default="python3")
    parser.add_argument("--no-pip", action="store_true")
    parser.add_argument("--native-tls", action="store_true", help="as the agent did: trust the system CA bundle")
    parser.add_argument("--agent-venv", action="store_true", help="also time ways to make the agent's own venv")
    parser.add_argument("--agent-wheels", default="/opt/rawvm/wheels", help="where user-data put the agent's files")
    args = parser.parse_args()
    lock = Path.cwd().parent / "bundle" / "pylock.toml"  # the one the agent installed
    if not lock.is_file():
        sys.exit(f"bench: no {lock}: not run as a rawvm task in its bundle's work directory?")
    scratch = Path(args.scratch)
    shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir(parents=True)
    python = shutil.which(args.python) or args.python
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH")}
    env |= {"UV_CACHE_DIR": args.uv_cache, "UV_NO_PROGRESS": "1", "UV_PYTHON_PREFERENCE": "only-system"}
    if args.native_tls:
        env |= {"UV_NATIVE_TLS": "1", "PIP_CERT": SYSTEM_CA}  # where the extra CA certificates went
    uv_venv = scratch / "uv-env"
    result: dict[str, float | int] = {"packages": len(tomllib.loads(lock.read_text())["packages"])}
    result["uv"] = timed(["uv", "venv", "--quiet", "--python", python, str(uv_venv)], env) + timed(
        ["uv", "pip", "sync", "--python", str(uv_venv / "bin" / "python"), str(lock)], env
    )
    shutil.rmtree(uv_venv, ignore_errors=True)
    if not args.no_pip:
        pip_venv = scratch / "pip-env"
        subprocess.run([python, "-m", "venv", str(pip_venv)], env=env, check=True)
        pip = [str(pip_venv / "bin" / "python"), "-m", "pip", "install", "--quiet", "--no-cache-dir"]
        pip += ["--disable-pip-version-check", "--require-hashes", "-r", "requirements.txt"]
        result["pip"] = timed(pip, env)
        shutil.rmtree(pip_venv, ignore_errors=True)
    if args.agent_venv:
        result |= agent_venv_variants(Path(args.agent_wheels), scratch, python, env)
    print("RAWVM-BENCH-INSTALL " + json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
