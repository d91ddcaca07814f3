"""Time to the first task, phase by phase, against a bare boot and against raw uv and pip (a benchmark, not a test).

    uv run python bench/startup.py          # qemu (TCG): bare cloud-init boot vs rawvm run, install vs uv vs pip
    uv run python bench/startup.py --runs 3 # the same three times (a bare boot before each), then medians
    uv run python bench/startup.py --big    # local provider: a CUDA torch environment (~2.8 GB), cold and warm
    uv run python bench/startup.py --uv-settings  # qemu: raw uv in the guest under each one-shot setting

Default (one run, side by side, on the same cached Debian image, one VM at a time; minutes under TCG; ``--runs N``
repeats the pair and prints the median and range of each goal's figure, since one TCG boot varies by ±1.5 s):

- bare: cloud-init boots with user-data that only prints the kernel's boot time and the clock to the console and
  powers off: the guest's seconds from its kernel start to the user-data running;
- rawvm: ``rawvm run --provider qemu`` of a modest locked environment (a few pure-Python packages and numpy),
  through the real CLI; the machine's phases (rawvm_agent/boot_phases.py, from ``rawvm ls --json``) on the same
  guest clock. The overhead over the bare boot is rawvm's kernel → first task started minus the environment's
  install (compared on its own below) minus the bare kernel → user-data; the ratio is the same two spans divided;
- install, inside the same guest (the first task, bench/startup_guest.py): the agent's install of the lock (its
  ``agent_up`` → ``environment_installed``: the bundle's download, the venv, the wait for the user-data's uv and
  ``uv pip sync``) against raw ``uv venv`` + ``uv pip sync`` of the same ``pylock.toml`` (what a user runs; cold uv
  cache, as the agent's was) and against
  ``pip install --require-hashes -r requirements.txt`` of the same lock (``rawvm export``, no pip cache).
  The same task then makes the agent's own venv both ways the user-data knows, from a fresh uv cache: uv from
  the hashed requirements and the agent wheel, and ``tar -xzf`` of the venv archive the laptop built
  (rawvm.agent.runtime): informative lines, since which way pays is measured there, not guessed.

``--big``: the same install comparison on the local provider (no VM: the download and the unpacking are what
count) for ``torch==2.5.1`` with its nvidia-* wheels: rawvm's install against raw uv, each with a uv cache of its
own under /tmp, cold (fresh caches) and then warm (a second run on the same caches). The caches are removed at
the end; it refuses to start with less than 40 GB free on /tmp.

``--uv-settings``: one ``rawvm run`` on qemu (no bare boot) whose task installs the same lock raw under each of
the uv settings issue 22 names for a one-shot install (startup_guest.UV_SETTINGS: link mode, a cache on tmpfs,
install concurrency, bytecode), interleaved over rounds, each from a cold cache: medians against uv's defaults.

Goals (issue 22): overhead over the bare boot ≤ 8 s under TCG; install ≤ 1.1x raw uv, ≥ 5x faster than pip.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import secrets
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml
from rawvm.agent.userdata import FETCH_FUNCTION, UNPACK_UV
from rawvm.agent.uvwheel import find_uv_wheel
from rawvm_agent.boot_phases import ORDER
from rawvm_images.local_vm import LocalImage, ensure_image
from rawvm_images.qemu_boot import BootFiles, choose_accel, prepare_boot, process_alive, qemu_command, start_detached

MARKER = "RAWVM-BENCH-BARE-USERDATA"
TIMEOUT = 1200.0
MODEST = "humanize\nsix\ntabulate\ntomli-w\nnumpy\n"  # none of them the agent's own: a cold uv cache
BIG = "torch==2.5.1\n"
BIG_FREE_GB = 40  # ~2.8 GB of wheels, unpacked into two uv caches, plus the venvs: keep ≥ 30 GB to the others
GUEST_SCRIPT = Path(__file__).with_name("startup_guest.py")
PHASES = ORDER  # the agent's own list of the way to the first task
_BARE = re.compile(rf"{MARKER} (\d+) (\d+\.\d+)")
_INSTALL = re.compile(r"RAWVM-BENCH-INSTALL (\{.*\})")


def load() -> str:
    return "load average " + " ".join(f"{x:.2f}" for x in os.getloadavg())


def bare_user_data(first_install: FirstInstall | None = None) -> str:
    """The bare boot: the same cloud-init stages, then only the kernel's boot time and the clock (the figure), then
    power off; with ``first_install``, raw uv's install of the lock runs after the figure, before the power-off."""
    script = f"echo {MARKER} $(awk '/^btime/ {{print $2}}' /proc/stat) $(date +%s.%N) > /dev/console"
    document: dict[str, Any] = {}
    if first_install is not None:
        document["write_files"] = first_install.files()
        script += f"; sh {FirstInstall.SCRIPT} > /dev/console 2>&1"
    document["runcmd"] = [["sh", "-c", script + "; poweroff"]]
    return "#cloud-config\n" + yaml.safe_dump(document, width=1000)


class FirstInstall:
    """Raw ``uv venv`` + ``uv pip sync`` of the lock as the first install on a fresh machine of the same image, in
    the bare boot's guest once its figure is printed: the same order rawvm's install always has (first, cold
    page cache, the boot's tail still running), where the raw installs in rawvm's guest come after it. uv is the
    one rawvm's user-data fetches (same wheel, same check); the proxy's CA as rawvm's user-data trusts it."""

    SCRIPT = "/opt/bench/first-install.sh"
    _RESULT = re.compile(r"RAWVM-BENCH-FIRST-UV (\d+\.\d+) (\d+\.\d+)")

    def __init__(self, lock: Path, ca_certs: list[Path]) -> None:
        self.lock = lock.read_text()
        self.ca = "".join(c.read_text() for c in ca_certs)
        self.uv = find_uv_wheel().for_arch("x86_64")

    def files(self) -> list[dict[str, str]]:
        # uv fetched, checked and unpacked by the user-data's own shell lines (FETCH_FUNCTION, UNPACK_UV).
        script = "\n".join(
            [
                "set -eu",
                "cat /opt/bench/ca.crt >> /etc/ssl/certs/ca-certificates.crt",
                "export UV_NATIVE_TLS=1 UV_CACHE_DIR=/tmp/first-uv-cache UV_NO_PROGRESS=1 HOME=/root",
                "WORK=$(mktemp -d)",
                FETCH_FUNCTION.rstrip("\n"),
                f'fetch {shlex.quote(self.uv.url)} "$WORK/uv.whl" {self.uv.sha256}',
                UNPACK_UV.rstrip("\n"),
                "start=$(date +%s.%N)",
                "uv venv --quiet --python /usr/bin/python3 /tmp/first-env",
                "uv pip sync --quiet --python /tmp/first-env/bin/python /opt/bench/pylock.toml",
                'echo "RAWVM-BENCH-FIRST-UV $start $(date +%s.%N)"',
            ]
        )
        return [
            {"path": "/opt/bench/pylock.toml", "content": self.lock},
            {"path": "/opt/bench/ca.crt", "content": self.ca},
            {"path": self.SCRIPT, "content": script + "\n"},
        ]

    @classmethod
    def seconds(cls, serial_log: str) -> float | None:
        found = cls._RESULT.search(serial_log)
        return float(found.group(2)) - float(found.group(1)) if found else None


def wait_for(check: Any, what: str) -> float:
    deadline = time.monotonic() + TIMEOUT
    while time.monotonic() < deadline:
        if check():
            return time.monotonic()
        time.sleep(0.25)
    raise SystemExit(f"bench: timed out waiting for {what}")


def bare_boot(image: LocalImage, work: Path, first_install: FirstInstall | None = None) -> dict[str, float]:
    files = BootFiles(work / "bare")
    prepare_boot(image, files, bare_user_data(first_install), hostname="bare")
    start = time.monotonic()
    pid = start_detached(qemu_command(image, files, accel=choose_accel()), files)

    def marked() -> re.Match[str] | None:
        return _BARE.search(files.serial_log.read_text(errors="replace")) if files.serial_log.exists() else None

    ran = wait_for(marked, "the bare user-data")
    off = wait_for(lambda: not process_alive(pid), "the bare qemu's exit")
    found = marked()
    assert found is not None
    btime, clock = int(found.group(1)), float(found.group(2))
    figures = {
        "kernel → user-data": clock - btime,
        "qemu start → user-data (host)": ran - start,
        "qemu exit": off - start,
    }
    if first_install is not None:
        log = files.serial_log.read_text(errors="replace")
        if (seconds := FirstInstall.seconds(log)) is None:
            print(f"bench: raw uv's first install in the bare guest printed no figure:\n{log[-1500:]}", file=sys.stderr)
        else:
            figures["raw uv, first install"] = seconds
    return figures


def rawvm(args: list[str], *, cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "rawvm.cli", *args]
    result = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise SystemExit(f"bench: rawvm {args[0]} failed ({result.returncode}):\n{result.stderr[-3000:]}")
    return result


def machine_phases(cluster: str, cwd: Path, env: dict[str, str]) -> dict[str, float]:
    """The cluster's one machine's boot phases, as the laptop kept them (``rawvm ls --json``)."""
    listing = json.loads(rawvm(["ls", "--json"], cwd=cwd, env=env).stdout)
    clusters = listing if isinstance(listing, list) else listing.get("clusters", [])
    for view in clusters:
        if view.get("name") == cluster:
            (machine,) = view["machines"]
            return {k: float(v) for k, v in machine["boot_phases"].items()}
    raise SystemExit(f"bench: rawvm ls --json has no cluster {cluster}")


def project(work: Path, requirements: str, env: dict[str, str], lock_args: list[str]) -> Path:
    """The shipped code: the requirements, the same lock exported as hashed requirements.txt, the guest script."""
    root = work / "project"
    root.mkdir(parents=True)
    (root / "requirements.in").write_text(requirements)
    bundle = work / "bundle"
    rawvm(["lock", *lock_args, "--from", "requirements.in", "-o", str(bundle)], cwd=root, env=env)
    rawvm(["export", "--format", "requirements", "-o", str(root / "requirements.txt"), str(bundle)], cwd=root, env=env)
    shutil.copy(GUEST_SCRIPT, root / GUEST_SCRIPT.name)
    return root


def run_and_measure(root: Path, env: dict[str, str], run_args: list[str], guest_args: list[str]) -> dict[str, Any]:
    """One ``rawvm run`` whose task is the raw install; its phases, the task's figures and the host's seconds."""
    cluster = f"bench-startup-{secrets.token_hex(3)}"
    argv = ["python3", GUEST_SCRIPT.name, *guest_args]
    start = time.monotonic()
    try:
        result = rawvm(
            ["run", "--name", cluster, "--timings", *run_args, "--from", "requirements.in", "--", *argv],
            cwd=root,
            env=env,
        )
        host = time.monotonic() - start
        phases = machine_phases(cluster, root, env)
    finally:
        subprocess.run([sys.executable, "-m", "rawvm.cli", "down", cluster], cwd=root, env=env, capture_output=True)
    found = _INSTALL.search(result.stdout)
    if not found:
        raise SystemExit(f"bench: the task printed no figures:\n{result.stdout[-2000:]}\n{result.stderr[-2000:]}")
    return {"phases": phases, "install": json.loads(found.group(1)), "host": host, "load": load()}


def span(phases: dict[str, float], first: str, last: str) -> float:
    return phases[last] - phases[first]


def print_phases(bare: dict[str, float], phases: dict[str, float]) -> None:
    print(f"{'phase (guest clock, s since the kernel started)':<52}{'bare':>8}{'rawvm':>8}{'step':>8}")
    print(f"{'user-data script started':<52}{bare['kernel → user-data']:>8.1f}")
    previous = "kernel_boot"
    for name in PHASES[1:]:
        if name in phases:
            at, step = span(phases, "kernel_boot", name), span(phases, previous, name)
            print(f"{name:<52}{'':>8}{at:>8.1f}{step:>8.1f}")
            previous = name


def proxy_ca_flags() -> list[str]:
    """``--extra-ca-cert`` for each CA this host trusts locally (the egress proxy's): the guest must trust it too."""
    found = sorted(Path("/usr/local/share/ca-certificates").glob("*.crt"))
    return [arg for cert in found for arg in ("--extra-ca-cert", str(cert))]


def qemu_setup(work: Path) -> tuple[LocalImage, dict[str, str], list[str], Path, list[str]]:
    """What both qemu benches start from: the cached image, the CLI's environment, the proxy CA flags, the locked
    modest project, and the guest script's common arguments."""
    image = ensure_image(progress=lambda msg: print(f"[image] {msg}", flush=True))
    env = {**os.environ, "RAWVM_STATE_DIR": str(work / "state")}
    ca_flags = proxy_ca_flags()
    root = project(work, MODEST, env, ["--provider", "qemu", "--python", "3.11"])
    guest = ["--uv-cache", "/tmp/bench-uv-cache", "--scratch", "/tmp/bench-scratch", "--python", "/usr/bin/python3"]
    return image, env, ca_flags, root, guest + (["--native-tls"] if ca_flags else [])


def qemu_bench(work: Path, runs: int) -> None:
    image, env, ca_flags, root, common = qemu_setup(work)
    first_install = FirstInstall(work / "bundle" / "pylock.toml", [Path(c) for c in ca_flags[1::2]])
    figures: list[dict[str, float]] = []
    for run in range(1, runs + 1):
        print(f"\n=== run {run} of {runs}: bare boot, then raw uv's first install there ({load()})", flush=True)
        bare = bare_boot(image, work / f"run{run}", first_install)
        print(f"  bare kernel → user-data {bare['kernel → user-data']:.1f}s", flush=True)
        print(f"rawvm run --provider qemu ({load()})", flush=True)
        guest = list(common)
        if run == 1:  # the informative lines once: the agent's venv both ways, raw uv again, raw uv's download
            guest += ["--agent-venv", "--uv-again", "--uv-local", "--uv-arrival", "--agent-log"]
        measured = run_and_measure(root, env, ["--provider", "qemu", "--keepalive", "30s", *ca_flags], guest)
        print(f"\nqemu accel {choose_accel()}, image {image.disk.parent.name}; rawvm run {measured['load']}")
        figures.append(print_run(bare, measured))
    if runs > 1:
        print_summary(figures)


def print_run(bare: dict[str, float], measured: dict[str, Any]) -> dict[str, float]:
    """One run's phases and figures, printed; the figures the goals are about."""
    phases, install = measured["phases"], measured["install"]
    print_phases(bare, phases)
    print(
        f"host: bare qemu start → user-data {bare['qemu start → user-data (host)']:.1f}s; "
        f"rawvm run (lock, launch, boot, install, task) → exit {measured['host']:.1f}s"
    )
    rawvm_install = span(phases, "agent_up", "environment_installed")  # the bundle's download included
    to_task = span(phases, "kernel_boot", "first_task_started")
    without_install = to_task - rawvm_install
    overhead = without_install - bare["kernel → user-data"]
    print(
        f"\noverhead over the bare boot (kernel → first task, less the environment's install): "
        f"{overhead:+.1f}s, {without_install / bare['kernel → user-data']:.2f}x ({to_task:.1f}s with it)  [goal ≤ 8 s]"
    )
    # The same without the two boots' spread: from the moment rawvm's own user-data script began (the point the
    # bare boot times) in the same guest; the rest is how far apart the two boots reached their scripts.
    in_guest = span(phases, "bootstrap_start", "first_task_started") - rawvm_install
    before_script = span(phases, "kernel_boot", "bootstrap_start") - bare["kernel → user-data"]
    print(
        f"  of which in rawvm's guest, its script's start → first task less the install: {in_guest:+.1f}s; "
        f"its kernel → script start against the bare boot's: {before_script:+.1f}s"
    )
    if (exec_at := install.pop("agent exec", None)) is not None:
        print(
            f"  the agent's start: venv ready → process exec'd {exec_at - phases['agent_venv_ready']:.1f}s (systemd), "
            f"exec → agent_up {phases['agent_up'] - exec_at:.1f}s (Python, imports, the agent's set-up)"
        )
    for label in [key for key in install if key.startswith("boot tail: ")]:
        at = install.pop(label) - phases["kernel_boot"]
        begun, ended = span(phases, "kernel_boot", "agent_up"), span(phases, "kernel_boot", "environment_installed")
        where = "before the install" if at < begun else "during the install" if at < ended else "after the install"
        print(f"  {label.removeprefix('boot tail: ')} at {at:.1f}s ({where})")
    print_uv_arrival(phases, install)
    print_agent_log(phases, install.pop("agent log", []))
    if imports := install.pop("agent import (cumulative us)", ""):
        print(f"  the agent's imports in the guest, cumulative microseconds: {imports}")
    for label, seconds in install.items():
        if label.startswith("agent: "):
            print(f"  the agent's venv in the guest, {label.removeprefix('agent: ')}: {seconds:.1f}s")
    if "uv again" in install:
        print(f"  raw uv twice, each from a cold cache: {install['uv']:.1f}s, then {install['uv again']:.1f}s")
    if "uv from local wheels" in install:
        print(
            f"  raw uv's download share: the lock's wheels by urllib {install['wheels download (urllib)']:.1f}s, "
            f"then uv from those files {install['uv from local wheels']:.1f}s (cold cache)"
        )
    print(
        f"install of {install['packages']} packages in the guest: rawvm {rawvm_install:.1f}s, "
        f"raw uv {install['uv']:.1f}s "
        f"({rawvm_install / install['uv']:.2f}x, goal ≤ 1.1x), pip {install['pip']:.1f}s "
        f"(rawvm {install['pip'] / rawvm_install:.1f}x faster, goal ≥ 5x)"
    )
    found = {
        "overhead": overhead,
        "overhead in guest": in_guest,
        "script start vs bare": before_script,
        "install": rawvm_install / install["uv"],
        "pip": install["pip"] / rawvm_install,
        "uv wait": span(phases, "bundle_downloaded", "uv_ready") if "uv_ready" in phases else 0.0,
    }
    if first := bare.get("raw uv, first install"):
        found["install vs first uv"] = rawvm_install / first
        print(
            f"  raw uv as the first install on a fresh machine (the bare boot's guest): {first:.1f}s; "
            f"rawvm's {rawvm_install:.1f}s is {rawvm_install / first:.2f}x that"
        )
    return found


def print_uv_arrival(phases: dict[str, float], install: dict[str, Any]) -> None:
    """When the boot's uv was in place against the agent's venv and the agent's start, and its steps alone."""
    if "uv: curl" not in install:
        return
    steps = ", ".join(
        f"{k.removeprefix('uv: ')} {install.pop(k):.1f}s" for k in ("uv: curl", "uv: sha256sum", "uv: unpack")
    )
    if (placed := install.pop("uv in place", None)) is not None:
        after_venv, after_up = placed - phases["agent_venv_ready"], placed - phases["agent_up"]
        print(
            f"  uv in place {after_venv:.1f}s after the agent's venv ({after_up:+.1f}s from agent_up); "
            f"alone, after the boot: {steps}"
        )
    else:
        print(f"  uv alone, after the boot: {steps}")


def print_agent_log(phases: dict[str, float], lines: list[list[Any]]) -> None:
    """The agent's log from ``agent_up`` to ``environment_installed``, each line at its offset from agent_up."""
    shown = [(at, text) for at, text in lines if phases["agent_up"] - 0.5 <= at <= phases["environment_installed"]]
    if shown:
        print("  the agent's log from agent_up (s after it):")
    for at, text in shown:
        print(f"    {at - phases['agent_up']:+6.2f}  {text}")


def print_summary(figures: list[dict[str, float]]) -> None:
    """Median and range of each goal's figure over the runs, and how many runs met it."""
    goals = {
        "overhead": (8.0, "s", "≤"),
        "overhead in guest": (8.0, "s", "≤"),
        "install": (1.1, "x", "≤"),
        "install vs first uv": (1.1, "x", "≤"),
        "pip": (5.0, "x", "≥"),
    }
    print(f"\n=== {len(figures)} runs")
    for key in (*goals, "script start vs bare", "uv wait"):
        values = sorted(f[key] for f in figures if key in f)
        if not values:
            continue
        line = f"{key:<22} median {statistics.median(values):6.2f}  range {values[0]:.2f} to {values[-1]:.2f}"
        if key in goals:
            limit, unit, sense = goals[key]
            met = sum(v <= limit if sense == "≤" else v >= limit for v in values)
            line += f"  goal {sense} {limit:g}{unit}: met in {met} of {len(values)}"
        print(line)


def settings_bench(work: Path, rounds: int) -> None:
    """Raw uv under each one-shot setting, in one qemu guest, against uv's defaults there."""
    _, env, ca_flags, root, common = qemu_setup(work)
    guest = [*common, "--no-pip", "--uv-arrival", "--uv-settings", "--rounds", str(rounds)]
    print(f"rawvm run --provider qemu ({load()})", flush=True)
    measured = run_and_measure(root, env, ["--provider", "qemu", "--keepalive", "30s", *ca_flags], guest)
    found: dict[str, list[float]] = measured["install"]["uv settings"]
    base = statistics.median(found["default"])
    packages = measured["install"]["packages"]
    print(f"\nraw uv venv + sync of {packages} packages in the guest, a cold cache each, {rounds} rounds interleaved")
    print(f"{'setting':<24}{'median':>8}{'vs default':>12}  rounds")
    for name, values in found.items():
        median = statistics.median(values)
        rounds_text = " ".join(f"{v:.1f}" for v in values)
        print(f"{name:<24}{median:>7.2f}s{median / base:>11.2f}x  {rounds_text}")
    rawvm_install = span(measured["phases"], "agent_up", "environment_installed")
    print_uv_arrival(measured["phases"], measured["install"])
    print(f"rawvm's own install there (agent_up → environment_installed, the first install): {rawvm_install:.1f}s")


def big_bench(work: Path) -> None:
    free_gb = shutil.disk_usage("/tmp").free / 1e9
    if free_gb < BIG_FREE_GB:
        raise SystemExit(f"bench: {free_gb:.0f} GB free on /tmp, --big wants {BIG_FREE_GB} GB")
    caches = work / "uv-rawvm", work / "uv-raw"
    env = {**os.environ, "RAWVM_STATE_DIR": str(work / "state"), "UV_CACHE_DIR": str(caches[0])}
    root = project(work, BIG, env, ["--python", "3.11", "--glibc", "2.36"])
    guest = ["--uv-cache", str(caches[1]), "--scratch", str(work / "scratch"), "--no-pip"]
    rows = []
    for label in ("cold", "warm"):
        print(f"{label}: rawvm run --provider local ({load()})", flush=True)
        measured = run_and_measure(root, env, ["--provider", "local", "--keepalive", "1m"], guest)
        rows.append((label, measured))
    print(f"\n{'torch 2.5.1 + nvidia-* (local)':<32}{'rawvm':>9}{'raw uv':>9}{'ratio':>8}  fetch")
    for label, measured in rows:
        phases, install = measured["phases"], measured["install"]
        ours = span(phases, "agent_up", "environment_installed")
        fetch = span(phases, "agent_up", "bundle_downloaded")
        print(
            f"{label + ' uv cache, ' + str(install['packages']) + ' packages':<32}{ours:>8.1f}s{install['uv']:>8.1f}s"
            f"{ours / install['uv']:>7.2f}x  {fetch:.1f}s  ({measured['load']})"
        )
    print("goal ≤ 1.1x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--big", action="store_true", help="a CUDA torch environment on the local provider")
    parser.add_argument("--uv-settings", action="store_true", help="qemu: raw uv under each one-shot setting")
    parser.add_argument("--rounds", type=int, default=3, help="--uv-settings: rounds over the settings")
    parser.add_argument("--runs", type=int, default=1, help="qemu: bare boot + rawvm run this many times, then medians")
    args = parser.parse_args()
    if args.runs < 1 or args.rounds < 1:
        parser.error("--runs and --rounds must be at least 1")
    work = Path(tempfile.mkdtemp(prefix="rawvm-bench-startup-"))
    try:
        if args.big:
            big_bench(work)
        elif args.uv_settings:
            settings_bench(work, args.rounds)
        else:
            qemu_bench(work, args.runs)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
