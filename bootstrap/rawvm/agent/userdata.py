"""The user-data that turns a fresh Linux machine into a rawvm agent (docs/architecture.md, Contract 3).

One ``#cloud-config`` document, rendered with PyYAML, boots EC2 and the local qemu VM alike:

1. ``write_files``: ``/etc/rawvm/agent.toml`` (0600; it holds only the token's sha256), the agent's TLS
   certificate, key and cluster CA as separate 0600 files under ``/etc/rawvm/tls/`` (the agent serves only mutual
   TLS, from before the bundle is installed, so the bundle cannot carry them), extra CA certificates, the agent's
   systemd units, and ``/opt/rawvm/bootstrap.sh``;
2. ``runcmd`` runs the script: the backstop shutdown first (whatever hangs later is bounded), CA trust, then the
   agent's venv: where the machine's architecture and ``/usr/bin/python3`` are what the launch expected, the venv
   built on the laptop (``rawvm.agent.runtime``, sha256-checked) downloads while systemd takes the dead-man units
   (no reload) and is unpacked with ``tar``; uv's wheel (exact URL + sha256) then downloads in the background at
   a lower priority while the agent starts, since the agent needs it only to install its bundle
   (``[install] uv_wait``). Elsewhere uv comes first and makes the venv from the agent's hashed requirements file
   (sha256-checked, installed with ``--require-hashes``: nothing is resolved at boot) and the agent wheel
   (sha256-checked, ``--no-deps``). Then the agent service starts.
   If any step fails the machine powers off: a failed bootstrap must not keep billing.

CA certificates go to ``/usr/local/share/ca-certificates`` (so any later ``update-ca-certificates`` keeps them)
and are appended to the system bundle ``/etc/ssl/certs/ca-certificates.crt`` that OpenSSL, Python and uv's
native TLS read on Debian and Ubuntu. Neither cloud-init's ``ca_certs`` module (~39 s of boot) nor
``update-ca-certificates`` itself (25-88 s measured under TCG, half of rawvm's boot overhead) is run.
"""

from __future__ import annotations

import gzip
import hashlib
import re
import shlex
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import unquote, urlsplit

import tomli_w
import yaml
from rawvm_agent.config import AgentConfig, config_to_dict
from rawvm_agent.systemd import render_backstop_command, render_units

from rawvm.agent.runtime import AGENT_VENV, SYSTEM_PYTHON
from rawvm.agent.staged import StagedAgent, StagedRuntime
from rawvm.agent.tls import ServerCredentials
from rawvm.agent.uvwheel import UvWheel
from rawvm.errors import UsageError
from rawvm.options import BACKSTOP_GRACE

USER_DATA_LIMIT = 16384  # bytes before base64: EC2's limit for user-data
AGENT_TOML = "/etc/rawvm/agent.toml"
AGENT_TLS_DIR = "/etc/rawvm/tls"
UV_DIR = "/usr/local/bin"
UV_BIN = f"{UV_DIR}/uv"
UV_WAIT = 900.0  # seconds the agent waits for the script's uv: a slow download, never a hang (the backstop runs)
AGENT_COMMAND = (f"{AGENT_VENV}/bin/rawvm-agent",)
BOOTSTRAP_SCRIPT = "/opt/rawvm/bootstrap.sh"
AGENT_REQUIREMENTS = "/opt/rawvm/wheels/agent-requirements.txt"
AGENT_UNIT = "rawvm-agent.service"
CA_DIR = "/usr/local/share/ca-certificates"
SYSTEM_CA_BUNDLE = "/etc/ssl/certs/ca-certificates.crt"  # what OpenSSL, Python and uv --native-tls read
UNIT_DIR = "/etc/systemd/system"

_PEM_CERT = re.compile(r"-----BEGIN CERTIFICATE-----\s.*?-----END CERTIFICATE-----", re.DOTALL)
_SHA256 = re.compile(r"[0-9a-f]{64}")

# Downloads URL to DEST with retries (boot-time networks flap), then checks the sha256. The URL is never
# echoed: presigned URLs carry a signature. curl where the image has it (every image rawvm boots does): a Python
# start costs seconds of CPU on a slow machine, and three downloads run at once.
FETCH_FUNCTION = """\
fetch() {  # fetch URL DEST SHA256
  if command -v curl >/dev/null 2>&1; then
    tries=0
    until curl -fsS --connect-timeout 30 --max-time 900 -o "$2" "$1"; do
      tries=$((tries + 1))
      if [ "$tries" -ge 6 ]; then echo "rawvm: download of $2 failed" >&2; return 1; fi
      sleep "$tries"
    done
  else
    python3 - "$1" "$2" <<'PY'
import shutil, sys, time, urllib.request
url, dest = sys.argv[1], sys.argv[2]
for attempt in range(6):
    try:
        with urllib.request.urlopen(url, timeout=120) as response, open(dest, "wb") as out:
            shutil.copyfileobj(response, out)
        break
    except OSError as exc:
        if attempt == 5:
            sys.exit(f"rawvm: download of {dest} failed: {exc}")
        time.sleep(2 ** attempt)
PY
  fi
  echo "$3  $2" | sha256sum -c --quiet -
}
"""

# Takes the uv binary out of its wheel (``uv-X.data/scripts/uv``, at ``$WORK/uv.whl``) into ``/usr/local/bin/uv``,
# without needing unzip on the image. Public, with FETCH_FUNCTION: bench/startup.py's raw-uv baseline fetches and
# unpacks its uv with these very lines.
UNPACK_UV = """\
python3 - "$WORK/uv.whl" <<'PY'
import os, shutil, sys, zipfile
with zipfile.ZipFile(sys.argv[1]) as wheel:
    names = [n for n in wheel.namelist() if n.endswith(".data/scripts/uv")]
    if len(names) != 1:
        sys.exit("rawvm: the uv wheel holds no uv binary")
    with wheel.open(names[0]) as src, open("/usr/local/bin/uv.part", "wb") as dst:
        shutil.copyfileobj(src, dst)
os.chmod("/usr/local/bin/uv.part", 0o755)
os.replace("/usr/local/bin/uv.part", "/usr/local/bin/uv")
PY
"""


class _Literal(str):
    """A string YAML should write as a ``|`` block (readable, and no escaping overhead in the 16 KB)."""


def _literal_representer(dumper: yaml.SafeDumper, data: _Literal) -> yaml.ScalarNode:
    return dumper.represent_scalar("tag:yaml.org,2002:str", str(data), style="|")


class _Dumper(yaml.SafeDumper):
    pass


_Dumper.add_representer(_Literal, _literal_representer)


def _check_sha256(value: str, what: str) -> None:
    if not _SHA256.fullmatch(value):
        raise UsageError(f"{what} sha256 must be 64 lowercase hex digits, got {value!r}")


def wheel_filename(url: str) -> str:
    """The wheel's file name, the last path segment of its URL (uv needs the real name to install it)."""
    name = unquote(PurePosixPath(urlsplit(url).path).name)
    if not name.endswith(".whl") or "/" in name:
        raise UsageError(f"the agent wheel URL must end in the wheel's file name (*.whl), got {name!r}")
    return name


def split_certificates(path: Path) -> list[str]:
    """The PEM certificates in ``path``, one string each (update-ca-certificates wants one per file)."""
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise UsageError(f"cannot read CA certificate file {path}: {exc}") from None
    certs = [m.group(0) + "\n" for m in _PEM_CERT.finditer(text)]
    if not certs:
        raise UsageError(f"{path} holds no PEM certificate (-----BEGIN CERTIFICATE-----); pass a PEM file")
    return certs


def without_token(config: AgentConfig) -> AgentConfig:
    """``config`` knowing the token only by its sha256: user-data is readable through IMDS and the EC2 API, so it
    never carries the token itself."""
    if not config.token:
        return config
    return replace(
        config, token="", token_sha256=config.token_sha256 or hashlib.sha256(config.token.encode()).hexdigest()
    )


def _unit_path(name: str) -> str:
    return name if name.startswith("/") else f"{UNIT_DIR}/{name}"


def phase_prologue(state_dir: str) -> list[str]:
    """Shell lines that start the machine's phase record (rawvm_agent/boot_phases.py: ``NAME EPOCH`` lines) with
    the kernel's boot time and this script's start, and define ``mark NAME`` for the later steps."""
    q = shlex.quote
    return [
        f"mkdir -p -m 700 {q(state_dir)}",
        f"PHASES={q(state_dir + '/boot-phases')}",
        'mark() { printf \'%s %s\\n\' "$1" "$(date +%s.%N)" >> "$PHASES"; }',
        'awk \'/^btime/ {print "kernel_boot", $2}\' /proc/stat >> "$PHASES"',
        "mark bootstrap_start",
    ]


def _runtime_check(runtime: StagedRuntime) -> str:
    """A ``case`` that sets ``AGENT_ARCHIVE`` when this machine can run the agent's venv archive: its architecture
    and its ``/usr/bin/python3``'s minor version (``--version`` does not start the interpreter: no seconds lost)."""
    target = runtime.target
    arches = {"x86_64": "x86_64|amd64", "aarch64": "aarch64|arm64"}.get(target.arch)
    if arches is None:
        raise UsageError(f"the agent's venv archive is for x86_64 or aarch64, not {target.arch!r}")
    if not re.fullmatch(r"3\.\d+", target.python):
        raise UsageError(f"the agent's venv archive wants a Python X.Y, got {target.python!r}")
    patterns = "|".join(f'{arch}:"Python {target.python}."*' for arch in arches.split("|"))
    return "\n".join(
        [
            f'case "$(uname -m):$({SYSTEM_PYTHON} --version 2>&1)" in',
            f"  {patterns}) AGENT_ARCHIVE=1 ;;",
            "  *) AGENT_ARCHIVE= ;;",
            "esac",
        ]
    )


def _install_script(
    agent_config: AgentConfig,
    *,
    agent: StagedAgent,
    uv_wheel: UvWheel,
    trust_system_store: bool,
    backstop: bool,
    early_units: Sequence[str],
) -> str:
    q = shlex.quote
    wheel_path = f"/opt/rawvm/wheels/{wheel_filename(agent.wheel_url)}"
    lines = [
        "#!/bin/sh",
        "# rawvm bootstrap (written by rawvm): the agent's venv, the agent service, and uv for its installs.",
        "set -eu",
        "umask 022",
        *phase_prologue(agent_config.state_dir),
    ]
    if backstop:
        # Backstop first: whatever happens next, the machine stops after max_lifetime + grace.
        lines.append(shlex.join(render_backstop_command(agent_config.idle.max_lifetime, BACKSTOP_GRACE)))
    if trust_system_store:
        lines += [f"cat {CA_DIR}/rawvm-*.crt >> {SYSTEM_CA_BUNDLE}", "export UV_NATIVE_TLS=1"]
    lines += [
        'export HOME="${HOME:-/root}" UV_CACHE_DIR=/var/cache/rawvm/uv UV_PYTHON_PREFERENCE=only-system',
        "WORK=$(mktemp -d)",
        f"mkdir -p /opt/rawvm/wheels {UV_DIR}",
        FETCH_FUNCTION.rstrip("\n"),
        'case "$(uname -m)" in',
    ]
    for arch, patterns in (("x86_64", "x86_64|amd64"), ("aarch64", "aarch64|arm64")):
        artifact = uv_wheel.for_arch(arch)
        _check_sha256(artifact.sha256, f"uv wheel {artifact.filename}")
        lines.append(f"  {patterns}) UV_URL={q(artifact.url)}; UV_SHA256={artifact.sha256} ;;")
    lines += [
        '  *) echo "rawvm: no uv wheel for $(uname -m)" >&2; exit 1 ;;',
        "esac",
        "install_uv() {  # checked, then unpacked atomically: the agent may be waiting for it to appear",
        '  fetch "$UV_URL" "$WORK/uv.whl" "$UV_SHA256"',
        UNPACK_UV.rstrip("\n"),
        "}",
        "UV_FETCH=",
    ]
    install = agent_config.install
    if install.index_url:
        lines.append(f"export UV_DEFAULT_INDEX={q(install.index_url)}")
    if install.extra_index_urls:
        lines.append(f"export UV_INDEX={q(' '.join(install.extra_index_urls))}")
    archive = "$WORK/agent-venv.tar.gz"
    if agent.runtime is not None:
        # The fast way (rawvm.agent.runtime): the venv built on the laptop for this machine's Python, unpacked.
        # Its download starts now, in the background, while systemd takes the dead-man units below.
        _check_sha256(agent.runtime.sha256, "agent venv archive")
        lines += [
            _runtime_check(agent.runtime),
            'if [ -n "$AGENT_ARCHIVE" ]; then',
            f"  fetch {q(agent.runtime.url)} {archive} {agent.runtime.sha256} & ARCHIVE_FETCH=$!",
            "fi",
        ]
    if early_units:
        # The dead-man units (backstop timer, ...) run before anything that can hang, and after reboots. Nothing
        # is reloaded: ``enable --no-reload`` only links them for the next boot (a reload took 2 s under TCG),
        # and ``start`` loads a unit systemd has not seen from disk. ``--no-block``: systemd runs the start jobs
        # while the script goes on; a blocking ``start`` of the same units once the agent is up waits for those
        # jobs and fails the script (so powers off) if one failed.
        lines += [
            f"systemctl --no-reload enable {' '.join([*early_units, AGENT_UNIT])}",
            f"systemctl start --no-block {' '.join(early_units)}",
        ]
    unpacked = [
        'wait "$ARCHIVE_FETCH"',
        f"mkdir -p {AGENT_VENV}",
        f"tar -xzf {archive} -C {AGENT_VENV} --no-same-owner",
        # uv now, in the background and below the agent in priority: the agent needs it only once its bundle is
        # downloaded ([install] uv_wait), and on a small machine every download slows the tar above and the
        # agent's start. ``$$`` is the script's pid in a subshell; ``wait`` below fails the script (and so powers
        # off) when this part failed.
        "(",
        "  renice -n 10 -p \"$(exec sh -c 'echo $PPID')\" >/dev/null 2>&1 || true",
        "  install_uv",
        ") & UV_FETCH=$!",
    ]
    # The slow way, for a machine the archive does not fit: uv, then the venv from the hashed requirements. Root
    # installs these: every artifact must match a hash of the file checked above, and only wheels (an sdist would
    # fetch an unpinned build backend); the agent wheel itself brings no dependency. Bytecode now, not at the
    # agent's first start: pynvml's import alone costs ~13 MB more without it.
    made_by_uv = [
        f"fetch {q(agent.wheel_url)} {q(wheel_path)} {agent.wheel_sha256} & AGENT_WHEEL_FETCH=$!",
        f"fetch {q(agent.requirements_url)} {AGENT_REQUIREMENTS} {agent.requirements_sha256} & REQUIREMENTS_FETCH=$!",
        "install_uv",
        f"uv venv --quiet --python python3 {AGENT_VENV}",
        'wait "$AGENT_WHEEL_FETCH"',
        'wait "$REQUIREMENTS_FETCH"',
        f"uv pip install --quiet --compile-bytecode --python {AGENT_VENV}/bin/python"
        f" --require-hashes --only-binary :all: -r {AGENT_REQUIREMENTS}",
        f"uv pip install --quiet --compile-bytecode --python {AGENT_VENV}/bin/python --no-deps {q(wheel_path)}",
    ]
    if agent.runtime is None:
        lines += made_by_uv
    else:
        lines += [
            'if [ -n "$AGENT_ARCHIVE" ]; then',
            *(f"  {line}" for line in unpacked),
            "else",
            *(f"  {line}" for line in made_by_uv),
            "fi",
        ]
    lines += [
        "mark agent_venv_ready",
        f"systemctl start {AGENT_UNIT}" if early_units else f"systemctl enable --now {AGENT_UNIT}",
        *([f"systemctl start {' '.join(early_units)}"] if early_units else []),
        'if [ -n "$UV_FETCH" ]; then wait "$UV_FETCH"; fi',
        'rm -rf "$WORK"',
    ]
    return "\n".join(lines) + "\n"


def render_user_data(
    agent_config: AgentConfig,
    *,
    channel: ServerCredentials,
    agent: StagedAgent,
    uv_wheel: UvWheel,
    extra_ca_certs: Sequence[Path] = (),
    backstop: bool = True,
) -> str:
    """The ``#cloud-config`` document for one machine (see the module docstring for what it does)."""
    _check_sha256(agent.wheel_sha256, "agent wheel")
    _check_sha256(agent.requirements_sha256, "agent requirements")
    agent_config = channel.configure(without_token(agent_config), AGENT_TLS_DIR)
    # The script puts uv there while the agent starts; the agent waits for it before its first install.
    agent_config = replace(agent_config, install=replace(agent_config.install, uv=UV_BIN, uv_wait=UV_WAIT))
    files: list[dict[str, Any]] = [
        {
            "path": AGENT_TOML,
            "permissions": "0600",
            "owner": "root:root",
            "content": _Literal(tomli_w.dumps(config_to_dict(agent_config))),
        }
    ]
    for path, pem in channel.files(AGENT_TLS_DIR):
        # cloud-init writes each with this mode from the start, and never logs write_files content.
        files.append({"path": path, "permissions": "0600", "owner": "root:root", "content": _Literal(pem.decode())})
    certs = [cert for path in extra_ca_certs for cert in split_certificates(Path(path))]
    for index, cert in enumerate(certs):
        files.append({"path": f"{CA_DIR}/rawvm-{index}.crt", "permissions": "0644", "content": _Literal(cert)})
    units = render_units(
        agent_command=list(AGENT_COMMAND),
        config_path=AGENT_TOML,
        max_lifetime=agent_config.idle.max_lifetime,
        grace=BACKSTOP_GRACE,
    )
    if not backstop:
        units = {name: text for name, text in units.items() if "backstop" not in name}
    # Units that install themselves ([Install]) start early; the agent itself once it is installed.
    early_units = sorted(name for name, text in units.items() if "[Install]" in text and name != AGENT_UNIT)
    for name, text in sorted(units.items()):
        files.append({"path": _unit_path(name), "permissions": "0644", "content": _Literal(text)})
    script = _install_script(
        agent_config,
        agent=agent,
        uv_wheel=uv_wheel,
        trust_system_store=bool(certs) or agent_config.install.native_tls,
        backstop=backstop,
        early_units=early_units,
    )
    files.append({"path": BOOTSTRAP_SCRIPT, "permissions": "0700", "content": _Literal(script)})
    # If the bootstrap fails, say so on the console and power off anyway.
    on_failure = (
        f"{BOOTSTRAP_SCRIPT} || {{ echo 'rawvm: bootstrap failed, powering off' >&2; "
        "systemctl poweroff || poweroff -f; }"
    )
    document = {"write_files": files, "runcmd": [["sh", "-c", on_failure]]}
    body = yaml.dump(document, Dumper=_Dumper, sort_keys=False, default_flow_style=False, width=1000)
    return "#cloud-config\n" + body


def encode_user_data(text: str) -> bytes:
    """Bytes for the machine: as is up to 16 KB, else gzip (cloud-init unpacks it); over 16 KB gzipped: error."""
    raw = text.encode()
    if len(raw) <= USER_DATA_LIMIT:
        return raw
    packed = gzip.compress(raw, mtime=0)
    if len(packed) > USER_DATA_LIMIT:
        raise UsageError(
            f"user-data is {len(packed)} bytes gzipped ({len(raw)} raw), over EC2's {USER_DATA_LIMIT}-byte limit: "
            "the agent config (bundle file URLs) or the extra CA certificates are too big; stage fewer files"
        )
    return packed


def decode_user_data(data: bytes) -> str:
    """The inverse of :func:`encode_user_data` (for tests and ``rawvm`` diagnostics)."""
    if data[:2] == b"\x1f\x8b":
        data = gzip.decompress(data)
    return data.decode()
