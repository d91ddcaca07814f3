"""User-data rendering (Contract 3): validated with the real ``cloud-init schema``, size limit, gzip, secrets."""

from __future__ import annotations

import datetime
import gzip
import hashlib
import os
import random
import shutil
import string
import subprocess
import tomllib
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import yaml
from rawvm.agent.runtime import SYSTEM_PYTHON, RuntimeTarget
from rawvm.agent.staged import StagedAgent, StagedRuntime
from rawvm.agent.tls import Authority, ServerCredentials
from rawvm.agent.userdata import (
    AGENT_TLS_DIR,
    AGENT_TOML,
    BOOTSTRAP_SCRIPT,
    USER_DATA_LIMIT,
    UV_BIN,
    UV_WAIT,
    decode_user_data,
    encode_user_data,
    render_user_data,
    wheel_filename,
    without_token,
)
from rawvm.agent.uvwheel import UvArtifact, UvWheel
from rawvm.errors import UsageError
from rawvm_agent.boot_phases import parse as parse_phases
from rawvm_agent.config import AgentConfig, BundleConfig, BundleFile, IdleConfig, InstallConfig, config_from_dict

from tests.systools import need_tool

TOKEN = "tok-9f8e7d6c5b4a39281706"
_AUTHORITY = Authority("rawvm agent CA test", datetime.timedelta(hours=1))
CHANNEL = ServerCredentials(_AUTHORITY.cert_pem, *_AUTHORITY.issue("rawvm agent test", ["server", "client"]))
WHEEL_URL = "http://10.0.2.2:8123/rawvm_agent-0.1.0-py3-none-any.whl?sig=a&b=c"
WHEEL_SHA = "ab" * 32
REQUIREMENTS_URL = "http://10.0.2.2:8123/cap/files/agent/agent-requirements.txt"
REQUIREMENTS_SHA = "9a" * 32
RUNTIME = StagedRuntime(
    "http://10.0.2.2:8123/cap/files/agent/agent-3.11-x86_64-0f.tar.gz",
    "7e" * 32,
    RuntimeTarget("3.11", "x86_64", "2.36"),
)
NO_RUNTIME = StagedAgent(WHEEL_URL, WHEEL_SHA, REQUIREMENTS_URL, REQUIREMENTS_SHA)
AGENT = StagedAgent(WHEEL_URL, WHEEL_SHA, REQUIREMENTS_URL, REQUIREMENTS_SHA, RUNTIME)
UV = UvWheel(
    version="0.13.9",
    x86_64=UvArtifact("uv-0.13.9-x86_64.whl", "https://files.example/uv-x86_64.whl", "11" * 32),
    aarch64=UvArtifact("uv-0.13.9-aarch64.whl", "https://files.example/uv-aarch64.whl", "22" * 32),
)
CERT = """-----BEGIN CERTIFICATE-----
MIIBszCCAVmgAwIBAgIUQm3C7v9yIbwb5gLGbS0Kq1QYzBEwCgYIKoZIzj0EAwIw
-----END CERTIFICATE-----
"""


def _config(**overrides: Any) -> AgentConfig:
    base: dict[str, Any] = {
        "cluster": "c1",
        "machine_id": "m-0",
        "bind": "0.0.0.0",
        "token": TOKEN,
        "sink": "https://bucket.s3.amazonaws.com/sink?X-Amz-Signature=zz",
        "secret_env": ("HF_TOKEN",),
        "bundle": BundleConfig(
            files=(BundleFile("pylock.toml", "https://host/pylock.toml", "cd" * 32),),
            manifest_sha256="ef" * 32,
        ),
        "install": InstallConfig(index_url="https://pypi.org/simple", extra_index_urls=("https://x/whl/cu128",)),
        "idle": IdleConfig(keepalive=300.0, max_lifetime=7200.0),
    }
    base.update(overrides)
    return AgentConfig(**base)


def _render(config: AgentConfig | None = None, **kwargs: Any) -> str:
    options: dict[str, Any] = {"agent": AGENT, "uv_wheel": UV}
    return render_user_data(config or _config(), channel=CHANNEL, **(options | kwargs))


def _files(text: str) -> dict[str, dict[str, Any]]:
    assert text.startswith("#cloud-config\n")
    doc = yaml.safe_load(text)
    return {entry["path"]: entry for entry in doc["write_files"]}


def cloud_init_schema(path: Path) -> subprocess.CompletedProcess[str]:
    exe = need_tool("cloud-init", "cloud-init")
    return subprocess.run([exe, "schema", "--config-file", str(path)], capture_output=True, text=True, timeout=120)


def test_rendered_user_data_passes_real_cloud_init_schema(tmp_path: Path) -> None:
    cert = tmp_path / "proxy.pem"
    cert.write_text(CERT + CERT.replace("MIIB", "MIIC"))
    path = tmp_path / "user-data"
    path.write_text(_render(extra_ca_certs=[cert]))
    result = cloud_init_schema(path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Valid cloud-config" in result.stdout


def test_cloud_init_schema_check_rejects_a_broken_document(tmp_path: Path) -> None:
    """The validator really validates: the same document with a bad file mode fails."""
    doc = yaml.safe_load(_render())
    doc["write_files"][0]["permissions"] = 600  # must be a string
    path = tmp_path / "user-data"
    path.write_text("#cloud-config\n" + yaml.safe_dump(doc))
    result = cloud_init_schema(path)
    assert result.returncode != 0
    assert "permissions" in result.stdout + result.stderr


def test_agent_toml_round_trips_to_the_same_config() -> None:
    config = _config()
    entry = _files(_render(config))[AGENT_TOML]
    assert entry["permissions"] == "0600"
    # What the machine gets: the token only as its sha256, the TLS files' paths, and where the script puts uv.
    expected = CHANNEL.configure(without_token(config), AGENT_TLS_DIR)
    expected = replace(expected, install=replace(expected.install, uv=UV_BIN, uv_wait=UV_WAIT))
    assert config_from_dict(tomllib.loads(entry["content"])) == expected


def test_the_token_is_nowhere_only_its_sha256_inside_agent_toml(tmp_path: Path) -> None:
    cert = tmp_path / "ca.crt"
    cert.write_text(CERT)
    text = _render(extra_ca_certs=[cert])
    digest = hashlib.sha256(TOKEN.encode()).hexdigest()
    assert f'token_sha256 = "{digest}"' in _files(text)[AGENT_TOML]["content"]
    assert TOKEN not in text and text.count(digest) == 1


def test_the_agents_tls_files_are_separate_0600_files_and_the_key_only_there() -> None:
    text = _render()
    files = _files(text)
    tls = {p: e for p, e in files.items() if p.startswith(AGENT_TLS_DIR + "/")}
    assert sorted(tls) == [f"{AGENT_TLS_DIR}/{n}" for n in ("agent.crt", "agent.key", "ca.crt")]
    assert all(e["permissions"] == "0600" and e["owner"] == "root:root" for e in tls.values())
    assert tls[f"{AGENT_TLS_DIR}/agent.key"]["content"] == CHANNEL.key.decode()
    assert text.count("PRIVATE KEY-----") == 2  # BEGIN and END of the one key
    agent_toml = files[AGENT_TOML]["content"]
    assert f'tls_key = "{AGENT_TLS_DIR}/agent.key"' in agent_toml and "PRIVATE KEY" not in agent_toml


def test_ca_certificates_are_written_one_per_file_and_trusted(tmp_path: Path) -> None:
    pem = tmp_path / "bundle.pem"
    pem.write_text("junk before\n" + CERT + CERT.replace("MIIB", "MIIC"))
    text = _render(extra_ca_certs=[pem])
    files = _files(text)
    crts = sorted(p for p in files if p.startswith("/usr/local/share/ca-certificates/"))
    assert [Path(p).suffix for p in crts] == [".crt", ".crt"]
    assert all(files[p]["content"].count("BEGIN CERTIFICATE") == 1 for p in crts)
    script = files[BOOTSTRAP_SCRIPT]["content"]
    assert "cat /usr/local/share/ca-certificates/rawvm-*.crt >> /etc/ssl/certs/ca-certificates.crt" in script
    assert "UV_NATIVE_TLS=1" in script
    assert "ca-certificates.crt" not in _files(_render())[BOOTSTRAP_SCRIPT]["content"]


def make_ca_and_leaf(tmp_path: Path) -> tuple[Path, Path]:
    """A fresh CA and a leaf certificate it signed, as PEM files (cryptography, dev dependency)."""
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.UTC)
    ca_key, leaf_key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "rawvm test proxy CA")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    leaf = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "pypi.example")]))
        .issuer_name(ca_name)
        .public_key(leaf_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .sign(ca_key, hashes.SHA256())
    )
    ca_pem, leaf_pem = tmp_path / "ca.pem", tmp_path / "leaf.pem"
    ca_pem.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    leaf_pem.write_bytes(leaf.public_bytes(serialization.Encoding.PEM))
    return ca_pem, leaf_pem


def test_ca_append_makes_the_system_bundle_trust_the_extra_ca(tmp_path: Path) -> None:
    """Run the rendered CA step against a copy of this host's bundle; OpenSSL must then verify a leaf certificate
    signed by a fresh test CA, and must not before (so the step, not luck, made it trusted)."""
    ca_pem, leaf_pem = make_ca_and_leaf(tmp_path)
    script = _files(_render(extra_ca_certs=[ca_pem]))[BOOTSTRAP_SCRIPT]["content"]
    step = next(line for line in script.splitlines() if line.startswith("cat /usr/local/share/ca-certificates/"))
    ca_dir, bundle = tmp_path / "ca-dir", tmp_path / "ca-certificates.crt"
    ca_dir.mkdir()
    shutil.copy(ca_pem, ca_dir / "rawvm-0.crt")
    shutil.copy("/etc/ssl/certs/ca-certificates.crt", bundle)

    def verifies() -> bool:
        args = [need_tool("openssl", "openssl"), "verify", "-CAfile", str(bundle), str(leaf_pem)]
        return subprocess.run(args, capture_output=True).returncode == 0

    assert not verifies()
    local_step = step.replace("/usr/local/share/ca-certificates", str(ca_dir)).replace(
        "/etc/ssl/certs/ca-certificates.crt", str(bundle)
    )
    subprocess.run(["sh", "-c", local_step], check=True)
    assert verifies()


def test_not_a_certificate_is_one_clear_error(tmp_path: Path) -> None:
    bad = tmp_path / "ca.pem"
    bad.write_text("hello")
    with pytest.raises(UsageError, match="holds no PEM certificate"):
        _render(extra_ca_certs=[bad])
    with pytest.raises(UsageError, match="cannot read CA certificate file"):
        _render(extra_ca_certs=[tmp_path / "missing.pem"])


def test_install_script_is_valid_sh_and_carries_both_uv_wheels() -> None:
    text = _render()
    script = _files(text)[BOOTSTRAP_SCRIPT]["content"]
    assert _files(text)[BOOTSTRAP_SCRIPT]["permissions"] == "0700"
    # dash (Debian/Ubuntu /bin/sh) parses it
    subprocess.run(["sh", "-n"], input=script, text=True, check=True)
    assert script.startswith("#!/bin/sh\n")
    assert "set -eu" in script
    for artifact in (UV.x86_64, UV.aarch64):
        assert artifact.url in script and artifact.sha256 in script
    assert "sha256sum -c --quiet -" in script
    assert f"/opt/rawvm/wheels/rawvm_agent-0.1.0-py3-none-any.whl {WHEEL_SHA}" in script
    assert f"fetch {RUNTIME.url} $WORK/agent-venv.tar.gz {RUNTIME.sha256}" in script
    # index settings from agent_config.install, in the environment (not on a command line)
    assert "export UV_DEFAULT_INDEX=https://pypi.org/simple" in script
    assert "export UV_INDEX=https://x/whl/cu128" in script
    # the agent starts before the script waits for uv; a failed uv download still fails the script
    assert script.index("systemctl start rawvm-agent.service") < script.index('wait "$UV_FETCH"; fi')
    assert script.rstrip().endswith('rm -rf "$WORK"')
    # the backstop is scheduled before anything that can hang
    assert script.index("shutdown") < script.index('fetch "$UV_URL"')
    assert script.index("shutdown") < script.index(f"fetch {RUNTIME.url}")


def test_failed_bootstrap_powers_off() -> None:
    doc = yaml.safe_load(_render())
    (command,) = doc["runcmd"]
    assert command[:2] == ["sh", "-c"]
    assert command[2].startswith(f"{BOOTSTRAP_SCRIPT} ||")
    assert "poweroff" in command[2]


@pytest.mark.parametrize("with_curl", [True, False])
def test_the_scripts_fetch_checks_the_sha256_with_curl_or_without(tmp_path: Path, with_curl: bool) -> None:
    """The script's ``fetch`` (the one its every download goes through), with only the tools it needs on PATH:
    ``curl`` where the image has it, else Python's urllib; either way a file whose sha256 differs is refused."""
    script = _files(_render())[BOOTSTRAP_SCRIPT]["content"]
    function = script[script.index("fetch() {") : script.index("\n}\n", script.index("fetch() {")) + 3]
    tools = ["python3", "sha256sum", *(["curl"] if with_curl else [])]
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in tools:
        found = shutil.which(tool)
        if found is None:
            pytest.skip(f"no {tool} on this host")
        (bin_dir / tool).symlink_to(found)
    source = tmp_path / "source.bin"
    source.write_bytes(os.urandom(100_000))
    digest = hashlib.sha256(source.read_bytes()).hexdigest()
    env = {"PATH": str(bin_dir), "HOME": str(tmp_path)}
    sh = shutil.which("sh") or "/bin/sh"

    def fetch(sha: str) -> subprocess.CompletedProcess[str]:
        line = f"{function}\nfetch {source.as_uri()} {tmp_path / 'dest.bin'} {sha}\n"
        return subprocess.run([sh, "-eu", "-c", line], env=env, capture_output=True, text=True, timeout=60)

    good = fetch(digest)
    assert good.returncode == 0, good.stderr
    assert (tmp_path / "dest.bin").read_bytes() == source.read_bytes()
    bad = fetch("0" * 64)
    assert bad.returncode != 0 and "FAILED" in bad.stdout + bad.stderr


def test_failure_path_really_powers_off(tmp_path: Path) -> None:
    """Run the runcmd line with a failing bootstrap and a recording ``systemctl`` on PATH."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    log = tmp_path / "calls"
    (bin_dir / "systemctl").write_text(f'#!/bin/sh\necho "$@" >> {log}\n')
    (bin_dir / "systemctl").chmod(0o755)
    failing = tmp_path / "bootstrap.sh"
    failing.write_text("#!/bin/sh\nexit 3\n")
    failing.chmod(0o755)
    (command,) = yaml.safe_load(_render())["runcmd"]
    line = command[2].replace(BOOTSTRAP_SCRIPT, str(failing))
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}"}
    result = subprocess.run(["sh", "-c", line], env=env, capture_output=True, text=True)
    assert log.read_text().split() == ["poweroff"]
    assert "bootstrap failed" in result.stderr


def test_systemd_units_are_installed_and_the_dead_man_units_start_first() -> None:
    files = _files(_render())
    units = [p for p in files if p.startswith("/etc/systemd/system/")]
    assert "/etc/systemd/system/rawvm-agent.service" in units
    assert all(files[p]["permissions"] == "0644" for p in units)
    script = files[BOOTSTRAP_SCRIPT]["content"]
    timers = [Path(p).name for p in units if p.endswith(".timer")]
    assert timers, "rawvm_agent.systemd renders a backstop timer"
    lines = script.splitlines()
    early = next(line for line in lines if line.startswith("systemctl start --no-block rawvm-backstop"))
    assert all(t in early for t in timers) and "rawvm-agent.service" not in early
    invocations = [i for i, line in enumerate(lines) if line.strip() == "install_uv"]
    assert invocations and all(lines.index(early) < i for i in invocations)
    # one enable for all of them, the agent included, with no systemd reload: a reload took 2 s under TCG
    (enable,) = [line for line in lines if " enable " in line]
    assert enable.startswith("systemctl --no-reload enable ")
    assert all(t in enable for t in timers) and "rawvm-agent.service" in enable and "--now" not in enable
    assert lines.index(enable) < lines.index(early)
    assert "daemon-reload" not in script
    (start,) = [line for line in lines if "rawvm-agent.service" in line and line.startswith("systemctl start")]
    assert lines.index(start) > lines.index("mark agent_venv_ready")
    # once the agent runs, a blocking start of the dead-man units waits for their jobs: a failed one fails the
    # script, which powers the machine off
    check = early.replace(" --no-block", "")
    assert check in lines and lines.index(check) > lines.index(start)


def test_no_backstop_when_disabled() -> None:
    files = _files(_render(backstop=False))
    assert "shutdown" not in files[BOOTSTRAP_SCRIPT]["content"]
    assert not [p for p in files if "backstop" in p]
    assert "/etc/systemd/system/rawvm-agent.service" in files


def test_the_agents_dependencies_install_only_from_the_checked_hashed_file() -> None:
    """Root installs them at boot: the requirements file is fetched and sha256-checked like the wheel, every
    artifact must match one of its hashes and be a wheel, and the agent wheel then adds no dependency."""
    script = _files(_render(agent=NO_RUNTIME))[BOOTSTRAP_SCRIPT]["content"]
    lines = [line.strip() for line in script.splitlines()]
    fetch = (
        f"fetch {REQUIREMENTS_URL} /opt/rawvm/wheels/agent-requirements.txt {REQUIREMENTS_SHA} & REQUIREMENTS_FETCH=$!"
    )
    assert fetch in lines  # in the background, while uv downloads; the install waits for it (and its check)
    assert lines.index(fetch) < lines.index("install_uv") < lines.index('wait "$REQUIREMENTS_FETCH"')
    assert "agent-venv.tar.gz" not in script and "AGENT_ARCHIVE" not in script
    installs = [line for line in lines if line.startswith("uv pip install")]
    assert len(installs) == 2
    deps, agent = installs
    assert "--require-hashes --only-binary :all: -r /opt/rawvm/wheels/agent-requirements.txt" in deps
    assert agent.endswith("--no-deps /opt/rawvm/wheels/rawvm_agent-0.1.0-py3-none-any.whl")
    assert lines.index(fetch) < lines.index('wait "$REQUIREMENTS_FETCH"') < lines.index(deps) < lines.index(agent)
    assert script.index("set -eu") < script.index(fetch)  # a failed check stops the script (and powers off)


def test_bad_inputs_are_clear_errors() -> None:
    with pytest.raises(UsageError, match="agent wheel sha256"):
        _render(agent=replace(AGENT, wheel_sha256="nothex"))
    with pytest.raises(UsageError, match="agent requirements sha256"):
        _render(agent=replace(AGENT, requirements_sha256=""))
    with pytest.raises(UsageError, match="agent venv archive sha256"):
        _render(agent=replace(AGENT, runtime=replace(RUNTIME, sha256="0")))
    with pytest.raises(UsageError, match="x86_64 or aarch64"):
        _render(agent=replace(AGENT, runtime=replace(RUNTIME, target=RuntimeTarget("3.11", "riscv64", "2.36"))))
    with pytest.raises(UsageError, match=r"Python X\.Y"):
        _render(agent=replace(AGENT, runtime=replace(RUNTIME, target=RuntimeTarget("3.11; rm -rf /", "x86_64", "2"))))
    with pytest.raises(UsageError, match=r"\*\.whl"):
        wheel_filename("https://host/download?id=3")
    assert wheel_filename("https://b.s3.amazonaws.com/c/rawvm_agent-0.1-py3-none-any.whl?X-Amz=1") == (
        "rawvm_agent-0.1-py3-none-any.whl"
    )


def _bundle(n: int, url_len: int, seed: int = 0) -> BundleConfig:
    rng = random.Random(seed)
    alphabet = string.ascii_letters + string.digits
    files = tuple(
        BundleFile(
            f"wheels/pkg{i}-1.0-py3-none-any.whl",
            "https://b.s3.amazonaws.com/x?" + "".join(rng.choice(alphabet) for _ in range(url_len)),
            f"{rng.getrandbits(256):064x}",
        )
        for i in range(n)
    )
    return BundleConfig(files=files, manifest_sha256="ef" * 32)


def test_small_user_data_is_sent_as_is() -> None:
    text = _render()
    assert len(text.encode()) <= USER_DATA_LIMIT
    assert encode_user_data(text) == text.encode()


def test_big_user_data_is_gzipped_and_still_valid(tmp_path: Path) -> None:
    # Repetitive URLs: over the limit raw, well under it compressed.
    files = tuple(BundleFile(f"wheels/p{i}.whl", f"https://host/bundle/wheels/p{i}.whl", "cd" * 32) for i in range(200))
    text = _render(_config(bundle=BundleConfig(files=files)))
    assert len(text.encode()) > USER_DATA_LIMIT
    data = encode_user_data(text)
    assert data[:2] == b"\x1f\x8b" and len(data) <= USER_DATA_LIMIT
    assert gzip.decompress(data).decode() == text == decode_user_data(data)
    path = tmp_path / "user-data"
    path.write_text(decode_user_data(data))
    assert cloud_init_schema(path).returncode == 0


def test_user_data_over_the_limit_is_one_clear_error() -> None:
    # Random presigned-URL-like strings do not compress: 40 files x 600 characters is ~24 KB gzipped.
    text = _render(_config(bundle=_bundle(40, 600)))
    with pytest.raises(UsageError) as info:
        encode_user_data(text)
    message = str(info.value)
    assert "16384-byte limit" in message and "gzipped" in message and "\n" not in message


def test_limit_boundary_is_exactly_16384_bytes() -> None:
    at_limit = "#cloud-config\n#" + "x" * (USER_DATA_LIMIT - len("#cloud-config\n#"))
    assert len(at_limit.encode()) == USER_DATA_LIMIT
    assert encode_user_data(at_limit) == at_limit.encode()
    assert encode_user_data(at_limit + "x")[:2] == b"\x1f\x8b"


def _host_target(python: str = "") -> RuntimeTarget:
    """This host as a machine: its ``/usr/bin/python3`` (the script checks that one), architecture and glibc."""
    system = Path(SYSTEM_PYTHON)
    if not system.is_file():
        pytest.skip(f"no {SYSTEM_PYTHON} on this host to run the agent's venv with")
    version = subprocess.run([system, "--version"], capture_output=True, text=True, check=True).stdout.split()[1]
    glibc = os.confstr("CS_GNU_LIBC_VERSION") or "glibc 2.17"
    return RuntimeTarget(python or ".".join(version.split(".")[:2]), os.uname().machine, glibc.split()[1])


def _run_script_here(tmp_path: Path, agent: StagedAgent) -> subprocess.CompletedProcess[str]:
    """The whole bootstrap script on this host, its system paths moved under tmp_path and ``systemctl`` a no-op:
    uv's real wheel from PyPI in the background, the agent's venv, then the wait for uv."""
    from rawvm.agent.uvwheel import find_uv_wheel

    config = _config(state_dir=str(tmp_path / "state"), install=InstallConfig())  # PyPI
    text = render_user_data(config, channel=CHANNEL, agent=agent, uv_wheel=find_uv_wheel(), backstop=False)
    moved = (
        _files(text)[BOOTSTRAP_SCRIPT]["content"]
        .replace("/usr/local/bin", str(tmp_path / "bin"))
        .replace("/opt/rawvm", str(tmp_path / "opt"))
        .replace("/var/cache/rawvm", str(tmp_path / "cache"))
        .replace("systemctl ", ": systemctl ")  # never touch this host's services
    )
    assert "shutdown" not in moved and SYSTEM_PYTHON in moved
    tmp_path.mkdir(parents=True, exist_ok=True)
    (tmp_path / "run.sh").write_text(moved)
    env = {**os.environ, "PATH": f"{tmp_path / 'bin'}:{os.environ['PATH']}"}  # the uv the script unpacks
    return subprocess.run(["sh", str(tmp_path / "run.sh")], capture_output=True, text=True, timeout=900, env=env)


def _check_agent_venv(venv: Path) -> None:
    python = venv / "bin" / "python"
    probe = "import sys, aiohttp, msgpack, psutil, pynvml, rawvm_agent.app; print(sys.prefix)"
    imported = subprocess.run([python, "-c", probe], capture_output=True, text=True)
    assert imported.returncode == 0 and imported.stdout.strip() == str(venv), imported.stderr
    helped = subprocess.run([python, venv / "bin" / "rawvm-agent", "--help"], capture_output=True, text=True)
    assert helped.returncode == 0 and "usage: rawvm-agent" in helped.stdout, helped.stderr


@pytest.mark.network
@pytest.mark.slow
def test_the_script_unpacks_the_laptops_venv_and_fetches_uv_beside_it_for_real(tmp_path: Path) -> None:
    """The fast path, for real on this host (a Debian like the qemu image): the venv archive built here for this
    host's Python is fetched, sha256-checked and unpacked; it runs the agent with the system Python; uv comes from
    PyPI meanwhile, and the script ends only once it is there. A wrong sha256 stops the script."""
    from rawvm.agent.runtime import build_agent_runtime
    from rawvm.agent.wheel import build_agent_wheel

    wheel = build_agent_wheel()
    archive = build_agent_runtime(wheel, _host_target())
    runtime = StagedRuntime(archive.as_uri(), hashlib.sha256(archive.read_bytes()).hexdigest(), _host_target())
    agent = StagedAgent(WHEEL_URL, WHEEL_SHA, REQUIREMENTS_URL, REQUIREMENTS_SHA, runtime)  # never fetched here
    result = _run_script_here(tmp_path, agent)
    assert result.returncode == 0, result.stdout + result.stderr
    _check_agent_venv(tmp_path / "opt" / "agent")
    version = subprocess.run([tmp_path / "bin" / "uv", "--version"], capture_output=True, text=True, check=True)
    assert version.stdout.startswith("uv ")
    assert not (tmp_path / "opt" / "wheels" / wheel_filename(WHEEL_URL)).exists()  # uv made no venv
    phases = parse_phases((tmp_path / "state" / "boot-phases").read_text())
    assert list(phases) == ["kernel_boot", "bootstrap_start", "agent_venv_ready"]

    bad = replace(agent, runtime=replace(runtime, sha256="0" * 64))
    failed = _run_script_here(tmp_path / "bad", bad)
    assert failed.returncode != 0 and "FAILED" in failed.stdout + failed.stderr
    assert not (tmp_path / "bad" / "opt" / "agent").exists()


@pytest.mark.network
@pytest.mark.slow
def test_a_machine_with_another_python_makes_the_agents_venv_with_uv_for_real(tmp_path: Path) -> None:
    """The slow path: the archive is for a Python this host has not, so the script waits for uv and makes the venv
    from the agent wheel and its hashed requirements (both fetched and checked; the packages from PyPI)."""
    from rawvm.agent.requirements import requirements_path
    from rawvm.agent.wheel import build_agent_wheel

    wheel = build_agent_wheel()
    requirements = requirements_path(wheel)
    unfit = StagedRuntime("https://nowhere.invalid/agent.tar.gz", "ab" * 32, _host_target(python="3.99"))
    agent = StagedAgent(
        wheel.as_uri(),
        hashlib.sha256(wheel.read_bytes()).hexdigest(),
        requirements.as_uri(),
        hashlib.sha256(requirements.read_bytes()).hexdigest(),
        unfit,
    )
    result = _run_script_here(tmp_path, agent)
    assert result.returncode == 0, result.stdout + result.stderr
    _check_agent_venv(tmp_path / "opt" / "agent")
    assert (tmp_path / "opt" / "wheels" / wheel.name).read_bytes() == wheel.read_bytes()
