"""The task bench/startup.py runs on the machine rawvm just set up: the same install, done raw (stdlib only).

It runs as the machine's first task, in the bundle's work directory, right after the agent installed the
environment, so it installs the very ``pylock.toml`` the agent installed (``../bundle/pylock.toml``), on the same
machine, the same disk and the same uv binary:

- ``uv``: ``uv venv`` + ``uv pip sync pylock.toml`` into a fresh venv (what a user runs by hand), uv cache in
  ``--uv-cache`` (a fresh directory: cold; the one from an earlier run: warm); with ``--uv-again`` then ``uv again``,
  the same with a cache of its own (``--uv-cache`` + ``-again``): the spread between two identical raw installs here;
- ``pip`` (unless ``--no-pip``): ``pip install --require-hashes -r requirements.txt`` of the same lock (exported
  with ``rawvm export``) into a fresh ``python -m venv`` with ``--no-cache-dir``; the venv's own creation
  (ensurepip) is not counted, in pip's favour.

With ``--uv-local``, ``uv from local wheels``: the lock's wheels downloaded first (``wheels download (urllib)``,
four at a time) and then the same two uv commands on a copy of the lock naming them as paths: how much of raw
uv's install is its download on this machine (the most a download ahead of uv could save).

With ``--uv-settings``, ``uv settings``: the same raw install under each of the settings issue 22 names for a
one-shot install on a fresh machine (``UV_SETTINGS``: link mode, where the cache lives, install concurrency, and
bytecode as the cost of asking for it), each from a cold cache of its own, the variants interleaved over
``--rounds`` rounds so that the guest's drift falls on all of them alike: seconds per variant, per round.

With ``--uv-arrival``, how uv's arrival in the boot splits: when the user-data put ``/usr/local/bin/uv`` in place
(``uv in place``, its mtime) and its three steps again on their own, now the boot is over, with the URL, sha256 and
unpacking code of the user-data's script: ``uv: curl``, ``uv: sha256sum``, ``uv: unpack``.

With ``--agent-log``, ``agent log``: the agent's own log lines (``state_dir/agent.log``) as ``[unix time, text]``:
what the agent did between its phases.

With ``--agent-venv`` it also makes the agent's own venv both ways the user-data knows (``agent_venv_variants``).

Prints one ``RAWVM-BENCH-INSTALL {json}`` line: seconds per side and the lock's package count.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shlex
import shutil
import ssl
import subprocess
import sys
import time
import tomllib
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

SYSTEM_CA = "/etc/ssl/certs/ca-certificates.crt"

# What else the machine does while the agent installs (unix times): cloud-init's last stage goes on with its
# modules once the user-data script (which starts the agent) has exited, and systemd then reaches its target.
BOOT_TAIL = [
    ("boot tail: cloud-final done", "cloud-final.service", "ActiveEnterTimestampMonotonic"),
    ("boot tail: multi-user.target", "multi-user.target", "ActiveEnterTimestampMonotonic"),
]


def timed(command: list[str], env: dict[str, str]) -> float:
    start = time.monotonic()
    subprocess.run(command, env=env, check=True, stdout=subprocess.DEVNULL)
    return time.monotonic() - start


# One-shot settings against uv's defaults (hardlink from a cache on the venv's disk, installs = vCPUs, no
# bytecode). The cache on tmpfs (RAM: unpacked once there, then copied) is what a throwaway cache could be.
UV_SETTINGS: dict[str, dict[str, str]] = {
    "default": {},
    "link copy": {"UV_LINK_MODE": "copy"},
    "cache on tmpfs, copy": {"UV_LINK_MODE": "copy", "UV_CACHE_DIR": "/dev/shm/bench-uv-cache"},
    "installs 1": {"UV_CONCURRENT_INSTALLS": "1"},
    "installs 4": {"UV_CONCURRENT_INSTALLS": "4"},
    "bytecode": {"UV_COMPILE_BYTECODE": "1"},
}


def raw_uv(lock: Path, venv: Path, python: str, env: dict[str, str]) -> float:
    """``uv venv`` + ``uv pip sync`` of ``lock`` into a fresh ``venv`` (what a user runs by hand); seconds."""
    seconds = timed(["uv", "venv", "--quiet", "--python", python, str(venv)], env)
    seconds += timed(["uv", "pip", "sync", "--python", str(venv / "bin" / "python"), str(lock)], env)
    shutil.rmtree(venv, ignore_errors=True)
    return seconds


def uv_settings(lock: Path, scratch: Path, python: str, env: dict[str, str], rounds: int) -> dict[str, list[float]]:
    """Each of ``UV_SETTINGS`` once per round, each from a cold cache of its own (removed after); the order turns
    each round so no variant always runs first."""
    names = list(UV_SETTINGS)
    found: dict[str, list[float]] = {name: [] for name in names}
    for round_ in range(rounds):
        for name in names[round_ % len(names) :] + names[: round_ % len(names)]:
            cache = str(scratch / "settings-cache")
            variant = env | {"UV_CACHE_DIR": cache} | UV_SETTINGS[name]
            found[name].append(raw_uv(lock, scratch / "settings-env", python, variant))
            shutil.rmtree(variant["UV_CACHE_DIR"], ignore_errors=True)
    return found


def agent_files(script: Path, into: Path) -> dict[str, Path]:
    """The agent's files as the user-data fetches them (its ``fetch URL DEST SHA256`` lines; the cluster's staging
    still serves them), fetched again into ``into``: the wheel, the requirements and the venv archive."""
    into.mkdir(parents=True, exist_ok=True)
    found: dict[str, Path] = {}
    for line in script.read_text().splitlines():
        words = shlex.split(line) if line.strip().startswith("fetch ") else []
        words = words[: words.index("&")] if "&" in words else words
        if len(words) != 4 or not words[1].startswith("http"):
            continue
        dest = into / Path(words[2]).name
        with urllib.request.urlopen(words[1], timeout=120) as response:
            dest.write_bytes(response.read())
        if hashlib.sha256(dest.read_bytes()).hexdigest() != words[3]:
            raise SystemExit(f"bench: {dest.name} does not match the user-data's sha256")
        found[dest.suffix if dest.suffix != ".gz" else ".tar.gz"] = dest
    return found


def agent_venv_variants(script: Path, scratch: Path, python: str, env: dict[str, str]) -> dict[str, float]:
    """The agent's venv made both ways the user-data knows, each from a fresh uv cache, on this machine: uv from
    the hashed requirements and the agent wheel (the way for a machine the archive does not fit), and ``tar`` of
    the venv archive built on the laptop (the way for one it fits)."""
    files = agent_files(script, scratch / "agent-files")
    wheel, archive, requirements = files[".whl"], files[".tar.gz"], files[".txt"]
    hashed = ["--require-hashes", "--only-binary", ":all:", "-r", str(requirements)]
    found: dict[str, float] = {}
    venv, cache = scratch / "agent-uv", scratch / "agent-cache"
    uv_env = env | {"UV_CACHE_DIR": str(cache)}
    try:
        seconds = timed(["uv", "venv", "--quiet", "--python", python, str(venv)], uv_env)
        for install in (["--compile-bytecode", *hashed], ["--compile-bytecode", "--no-deps", str(wheel)]):
            command = ["uv", "pip", "install", "--quiet", "--python", str(venv / "bin" / "python"), *install]
            seconds += timed(command, uv_env)
        found["agent: uv (2 installs, bytecode)"] = seconds
    except subprocess.CalledProcessError as exc:
        print(f"bench: the uv way failed: {exc}", file=sys.stderr)
        found["agent: uv (2 installs, bytecode)"] = -1.0
    shutil.rmtree(venv, ignore_errors=True)
    shutil.rmtree(cache, ignore_errors=True)
    venv.mkdir()
    found["agent: the laptop's venv archive (tar -xzf)"] = timed(["tar", "-xzf", str(archive), "-C", str(venv)], env)
    shutil.rmtree(venv, ignore_errors=True)
    return found


def uv_arrival(script: Path, scratch: Path, python: str) -> dict[str, float]:
    """When the boot's uv came, and its download, check and unpack timed again alone, with the script's own URL,
    sha256 and unpacking lines (the ``x86_64|amd64)`` case and the ``<<'PY'`` block naming ``uv.whl``)."""
    text = script.read_text()
    found: dict[str, float] = {}
    if (placed := Path("/usr/local/bin/uv")).exists():
        found["uv in place"] = placed.stat().st_mtime
    case = next(line for line in text.splitlines() if line.strip().startswith("x86_64|amd64) UV_URL="))
    url, sha256 = shlex.split(case.split(")", 1)[1].replace(";", " "))[:2]
    url, sha256 = url.removeprefix("UV_URL="), sha256.removeprefix("UV_SHA256=")
    unpack = text.split("python3 - \"$WORK/uv.whl\" <<'PY'\n", 1)[1].split("\nPY\n", 1)[0]
    wheel = scratch / "uv.whl"
    found["uv: curl"] = timed(["curl", "-fsS", "-o", str(wheel), url], os.environ.copy())
    start = time.monotonic()
    check = subprocess.run(["sha256sum", str(wheel)], capture_output=True, text=True, check=True).stdout
    found["uv: sha256sum"] = time.monotonic() - start
    if check.split()[0] != sha256:
        raise SystemExit("bench: the uv wheel does not match the script's sha256")
    code = unpack.replace("/usr/local/bin/", f"{scratch}/")
    found["uv: unpack"] = timed([python, "-c", code, str(wheel)], os.environ.copy())
    return found


def agent_log(state_dir: Path, limit: int = 80) -> list[list[float | str]]:
    """The first ``limit`` lines of the agent's log with their times (its format: ``%(asctime)s ...``, the
    machine's local time, with milliseconds)."""
    lines: list[list[float | str]] = []
    for line in (state_dir / "agent.log").read_text(errors="replace").splitlines()[:limit]:
        stamp, _, text = line[:23], line[23:24], line[24:]
        try:
            when = time.mktime(time.strptime(stamp[:19], "%Y-%m-%d %H:%M:%S")) + int(stamp[20:23]) / 1000
        except ValueError:
            continue
        lines.append([when, text[:160]])
    return lines


def local_wheels(lock: Path, into: Path, env: dict[str, str]) -> tuple[Path, float]:
    """The lock's wheels downloaded into ``into`` (four at a time, sha256 checked) and a copy of the lock naming
    them as paths; the seconds the downloads took."""
    text = lock.read_text()
    wheels = [w for p in tomllib.loads(text)["packages"] for w in p.get("wheels", [])[:1] if "url" in w]
    into.mkdir(parents=True, exist_ok=True)
    context = ssl.create_default_context(cafile=env.get("PIP_CERT") or None)

    def download(wheel: dict[str, object]) -> None:
        dest = into / str(wheel["url"]).rsplit("/", 1)[-1]
        with urllib.request.urlopen(str(wheel["url"]), timeout=120, context=context) as response:
            dest.write_bytes(response.read())
        if hashlib.sha256(dest.read_bytes()).hexdigest() != wheel["hashes"]["sha256"]:  # type: ignore[index]
            raise SystemExit(f"bench: {dest.name} does not match the lock's sha256")

    start = time.monotonic()
    with ThreadPoolExecutor(4) as pool:
        list(pool.map(download, wheels))
    seconds = time.monotonic() - start
    for wheel in wheels:
        url = str(wheel["url"])
        text = text.replace(f'url = "{url}"', f'path = "{into / url.rsplit("/", 1)[-1]}"')
    local = into / "pylock.toml"
    local.write_text(text)
    return local, seconds


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--uv-cache", required=True)
    parser.add_argument("--scratch", required=True)
    parser.add_argument("--python", default="python3")
    parser.add_argument("--no-pip", action="store_true")
    parser.add_argument("--uv-again", action="store_true", help="a second raw uv install, from a cold cache too")
    parser.add_argument("--uv-local", action="store_true", help="also uv from the lock's wheels downloaded first")
    parser.add_argument("--agent-log", action="store_true", help="also the agent's log lines with their times")
    parser.add_argument("--uv-arrival", action="store_true", help="also when uv came and its steps alone")
    parser.add_argument("--uv-settings", action="store_true", help="also raw uv under each of UV_SETTINGS")
    parser.add_argument("--rounds", type=int, default=3, help="--uv-settings: rounds over the variants")
    parser.add_argument("--native-tls", action="store_true", help="as the agent did: trust the system CA bundle")
    parser.add_argument("--agent-venv", action="store_true", help="also time ways to make the agent's own venv")
    parser.add_argument("--bootstrap", default="/opt/rawvm/bootstrap.sh", help="the user-data's script")
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
    result: dict[str, Any] = {"packages": len(tomllib.loads(lock.read_text())["packages"])}
    # Twice, each from a cold uv cache of its own: how far two identical raw installs on this machine differ
    # (the network and the guest warm up: the agent's install always came first).
    runs = [("uv", args.uv_cache), *([("uv again", args.uv_cache + "-again")] if args.uv_again else [])]
    for key, cache in runs:
        result[key] = raw_uv(lock, uv_venv, python, env | {"UV_CACHE_DIR": cache})
    if args.uv_local:
        local, result["wheels download (urllib)"] = local_wheels(lock, scratch / "wheels", env)
        result["uv from local wheels"] = raw_uv(
            local, uv_venv, python, env | {"UV_CACHE_DIR": args.uv_cache + "-local"}
        )
    if args.agent_log:
        result["agent log"] = agent_log(Path.cwd().parent)
    if args.uv_arrival:
        result |= uv_arrival(Path(args.bootstrap), scratch, python)
    if args.uv_settings:
        result["uv settings"] = uv_settings(lock, scratch, python, env, args.rounds)
    if not args.no_pip:
        pip_venv = scratch / "pip-env"
        subprocess.run([python, "-m", "venv", str(pip_venv)], env=env, check=True)
        pip = [str(pip_venv / "bin" / "python"), "-m", "pip", "install", "--quiet", "--no-cache-dir"]
        pip += ["--disable-pip-version-check", "--require-hashes", "-r", "requirements.txt"]
        result["pip"] = timed(pip, env)
        shutil.rmtree(pip_venv, ignore_errors=True)
    if args.agent_venv:
        try:
            result |= agent_venv_variants(Path(args.bootstrap), scratch, python, env)
        except (OSError, KeyError) as exc:  # not root, or a script without the archive
            print(f"bench: no agent venv variants: {exc!r}", file=sys.stderr)
    agent_python = Path("/opt/rawvm/agent/bin/python")
    if args.agent_venv and agent_python.exists():  # where the agent's start goes on this machine
        importtime = subprocess.run(
            [agent_python, "-X", "importtime", "-c", "import rawvm_agent.server"], capture_output=True, text=True
        ).stderr
        rows = [line.split("|") for line in importtime.splitlines() if line.startswith("import time:")][1:]
        top = sorted(((int(r[1]), r[2].strip()) for r in rows if len(r) == 3), reverse=True)[:8]
        result["agent import (cumulative us)"] = ", ".join(f"{name} {us}" for us, name in top)
    if (started := agent_exec_time()) is not None:
        result["agent exec"] = started
    for label, unit, prop in BOOT_TAIL:
        if (at := unit_time(unit, prop)) is not None:
            result[label] = at
    print("RAWVM-BENCH-INSTALL " + json.dumps(result), flush=True)


def agent_exec_time() -> float | None:
    """When systemd exec'd the agent's process (unix time, from its monotonic stamp): splits the way from the
    agent's venv to ``agent_up`` into systemd's start and the agent's own (Python, imports, set-up)."""
    return unit_time("rawvm-agent.service", "ExecMainStartTimestampMonotonic")


def unit_time(unit: str, prop: str) -> float | None:
    """A systemd unit's monotonic timestamp ``prop`` as unix time; None when unset."""
    shown = subprocess.run(["systemctl", "show", "-p", prop, unit], capture_output=True, text=True).stdout.strip()
    micros = shown.partition("=")[2]
    if not micros.isdigit() or int(micros) == 0:
        return None
    return time.time() - (time.monotonic() - int(micros) / 1e6)


if __name__ == "__main__":
    main()
