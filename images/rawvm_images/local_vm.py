"""The local VM image: a Debian 12 root made with debootstrap, packed into a raw ext4 disk without loop mounts.

Built once into a cache directory keyed by a hash of the recipe, then booted through qcow2 overlays so the base
stays pristine. The recipe and its timings are in ``shared/vm-facts.md``. The host's CA certificates are NOT
baked in: a guest behind a TLS-intercepting proxy gets them through the user-data's extra CA option, as a real
user's machine would.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
import shutil
import subprocess
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

Progress = Callable[[str], None]

SUITE = "bookworm"
DEBIAN_12_GLIBC = "2.36"  # bookworm's libc6: what a lock for this image targets before the image is built
ARCH = "x86_64"
DEFAULT_MIRROR = "http://deb.debian.org/debian"
KERNEL_CMDLINE = "root=/dev/vda rw console=ttyS0 net.ifnames=0"
ROOT_LABEL = "rootfs"
DISK_SIZE = "4G"

# python3-cffi-backend: debootstrap does not resolve cloud-init's virtual dependency on it (vm-facts.md).
PACKAGES = (
    "systemd-sysv",
    "udev",
    "linux-image-cloud-amd64",
    "cloud-init",
    "python3",
    "python3-venv",
    "python3-cffi-backend",
    "ca-certificates",
    "curl",
    # logind needs D-Bus: without it `shutdown -P +N` (the backstop) cannot schedule anything. Cloud images have it.
    "dbus",
    "iproute2",
    "ifupdown",
    "isc-dhcp-client",
    "netbase",
)

# Files written inside the root, relative path -> content. Part of the recipe hash.
ROOT_FILES: dict[str, str] = {
    "etc/fstab": f"LABEL={ROOT_LABEL} / ext4 defaults 0 1\n",
    "etc/network/interfaces": (
        "source /etc/network/interfaces.d/*\nauto lo\niface lo inet loopback\nauto eth0\niface eth0 inet dhcp\n"
    ),
    # C.UTF-8 is built into glibc; cloud-init's default en_US.UTF-8 would need the locales package.
    "etc/cloud/cloud.cfg.d/99_nocloud.cfg": "datasource_list: [ NoCloud, None ]\nlocale: C.UTF-8\n",
    "etc/hostname": "rawvm\n",
    # The serial console is the only view into a machine that never answered: show the journal there too
    # (systemd's restarts and failures of the agent unit, the agent's own log lines).
    "etc/systemd/journald.conf.d/rawvm-console.conf": "[Journal]\nForwardToConsole=yes\nMaxLevelConsole=info\n",
    # Empty: systemd makes a fresh machine-id on every first boot, so clones of the image differ.
    "etc/machine-id": "",
}

# Bump when the build steps change in a way the constants above do not show.
RECIPE_VERSION = 1

TOOLS = {
    "debootstrap": "debootstrap",
    "mkfs.ext4": "e2fsprogs",
    "qemu-img": "qemu-utils",
    "qemu-system-x86_64": "qemu-system-x86",
    "cloud-localds": "cloud-image-utils",
}


class ImageError(RuntimeError):
    """The image cannot be built; the message says what is missing or what failed, and what to do."""


@dataclass(frozen=True)
class LocalImage:
    disk: Path  # raw ext4 disk, label rootfs; boot it through an overlay, never directly
    kernel: Path
    initrd: Path
    glibc: str  # e.g. "2.36": the manylinux level the resolver locks for
    python: str  # e.g. "3.11": the guest's python3
    arch: str  # e.g. "x86_64"
    cmdline: str = KERNEL_CMDLINE


def recipe_key() -> str:
    """A short hash of everything that decides the image's contents (not the mirror: any mirror serves the same)."""
    recipe = {
        "version": RECIPE_VERSION,
        "suite": SUITE,
        "arch": ARCH,
        "packages": sorted(PACKAGES),
        "files": ROOT_FILES,
        "disk": DISK_SIZE,
        "label": ROOT_LABEL,
    }
    digest = hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()
    return f"debian-{SUITE}-{ARCH}-{digest[:16]}"


def default_cache_dir() -> Path:
    """``$RAWVM_CACHE/images`` when set, else ``~/.cache/rawvm/images``."""
    root = os.environ.get("RAWVM_CACHE")
    return Path(root) / "images" if root else Path.home() / ".cache" / "rawvm" / "images"


def missing_tools(names: tuple[str, ...] = tuple(TOOLS)) -> list[str]:
    """The tools not on PATH (sbin included: debootstrap and mkfs live there), as 'tool (Debian package)'."""
    path = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin"])
    return [f"{name} (Debian package {TOOLS[name]})" for name in names if shutil.which(name, path=path) is None]


def require_tools(names: tuple[str, ...] = tuple(TOOLS)) -> None:
    missing = missing_tools(names)
    if missing:
        packages = " ".join(sorted({TOOLS[n] for n in names if f"{n} (Debian package {TOOLS[n]})" in missing}))
        raise ImageError(f"the local VM needs {', '.join(missing)}: run 'apt-get install {packages}'")


def host_debian_mirror(sources_dir: Path = Path("/etc/apt")) -> str:
    """The Debian mirror the host's apt uses (deb822 .sources or one-line sources.list); the default otherwise."""
    candidates: list[str] = []
    for path in sorted((sources_dir / "sources.list.d").glob("*.sources")):
        for stanza in path.read_text(errors="replace").split("\n\n"):
            uris = re.search(r"^URIs:\s*(\S+)", stanza, re.MULTILINE)
            suites = re.search(r"^Suites:\s*(.+)$", stanza, re.MULTILINE)
            if uris and suites and SUITE in suites.group(1).split():
                candidates.append(uris.group(1))
    one_line = sources_dir / "sources.list"
    if one_line.is_file():
        for line in one_line.read_text(errors="replace").splitlines():
            match = re.match(r"^\s*deb\s+(?:\[[^]]*\]\s+)?(\S+)\s+(\S+)", line)
            if match and match.group(2) == SUITE:
                candidates.append(match.group(1))
    for uri in candidates:
        if "security" not in uri:
            return uri.rstrip("/")
    return DEFAULT_MIRROR


def package_version(root: Path, package: str) -> str:
    """The installed version of a Debian package inside ``root``, read from its dpkg database (no chroot)."""
    status = (root / "var/lib/dpkg/status").read_text(errors="replace")
    for stanza in status.split("\n\n"):
        if re.search(rf"^Package: {re.escape(package)}$", stanza, re.MULTILINE) and "Status: install ok installed" in (
            stanza
        ):
            version = re.search(r"^Version: (\S+)$", stanza, re.MULTILINE)
            if version:
                return version.group(1)
    raise ImageError(f"image build: package {package} is not installed in {root}")


def major_minor(debian_version: str) -> str:
    """'2.36-9+deb12u10' -> '2.36'; '3.11.2-1+b1' -> '3.11'."""
    match = re.match(r"^(?:\d+:)?(\d+)\.(\d+)", debian_version)
    if not match:
        raise ImageError(f"image build: cannot read a version from {debian_version!r}")
    return f"{match.group(1)}.{match.group(2)}"


def _run(argv: list[str], log: Path, what: str) -> None:
    with log.open("ab") as out:
        out.write(f"$ {' '.join(argv)}\n".encode())
        out.flush()
        result = subprocess.run(argv, stdout=out, stderr=subprocess.STDOUT, check=False)
    if result.returncode != 0:
        tail = log.read_text(errors="replace").splitlines()[-5:]
        raise ImageError(f"image build: {what} failed (exit {result.returncode}); see {log}: {' | '.join(tail)}")


def _configure_root(root: Path) -> None:
    for rel, content in ROOT_FILES.items():
        target = root / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(content)
    # A stale D-Bus machine-id would give every clone the same identity.
    with contextlib.suppress(FileNotFoundError):
        (root / "var/lib/dbus/machine-id").unlink()
    for deb in (root / "var/cache/apt/archives").glob("*.deb"):
        deb.unlink()


def _single(root: Path, pattern: str) -> Path:
    found = sorted((root / "boot").glob(pattern))
    if len(found) != 1:
        raise ImageError(f"image build: expected one /boot/{pattern} in the root, found {len(found)}")
    return found[0]


def build_image(out: Path, mirror: str, progress: Progress) -> LocalImage:
    """Build the Debian image under ``out`` with debootstrap from ``mirror``; what it holds (glibc, Python)."""
    root = out / "root"
    log = out / "build.log"
    progress(f"debootstrap {SUITE} from {mirror} (a few minutes)")
    _run(
        [
            "debootstrap",
            "--variant=minbase",
            f"--include={','.join(PACKAGES)}",
            SUITE,
            str(root),
            mirror,
        ],
        log,
        "debootstrap",
    )
    _configure_root(root)
    glibc = major_minor(package_version(root, "libc6"))
    python = major_minor(package_version(root, "python3"))
    shutil.copy2(_single(root, "vmlinuz-*"), out / "vmlinuz")
    shutil.copy2(_single(root, "initrd.img-*"), out / "initrd.img")
    progress("mkfs.ext4 -d: packing the root into a raw disk")
    _run(["mkfs.ext4", "-q", "-d", str(root), "-L", ROOT_LABEL, str(out / "disk.raw"), DISK_SIZE], log, "mkfs.ext4")
    shutil.rmtree(root)
    meta = {"glibc": glibc, "python": python, "arch": ARCH, "cmdline": KERNEL_CMDLINE, "mirror": mirror}
    (out / "image.json").write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
    return _load(out)


def _load(directory: Path) -> LocalImage:
    meta = json.loads((directory / "image.json").read_text())
    return LocalImage(
        disk=directory / "disk.raw",
        kernel=directory / "vmlinuz",
        initrd=directory / "initrd.img",
        glibc=meta["glibc"],
        python=meta["python"],
        arch=meta["arch"],
        cmdline=meta["cmdline"],
    )


@contextlib.contextmanager
def _locked(path: Path, say: Progress) -> Iterator[None]:
    """An exclusive flock: a second builder waits, then finds the finished image."""
    with path.open("a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            say("another process is building the local VM image; waiting for it")
            fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def cached_image(cache_dir: Path | None = None) -> LocalImage | None:
    """The built image for the current recipe, or None when it has not been built yet."""
    directory = (cache_dir or default_cache_dir()) / recipe_key()
    return _load(directory) if (directory / "image.json").is_file() else None


def ensure_image(cache_dir: Path | None = None, progress: Progress | None = None) -> LocalImage:
    """The local VM image, built on first use (minutes, needs root for debootstrap), then taken from the cache."""
    cache = cache_dir or default_cache_dir()
    say: Progress = progress or (lambda _msg: None)
    found = cached_image(cache)
    if found:
        return found
    require_tools(("debootstrap", "mkfs.ext4"))
    if os.geteuid() != 0:
        raise ImageError("building the local VM image runs debootstrap, which needs root: run it once as root")
    cache.mkdir(parents=True, exist_ok=True)
    key = recipe_key()
    with _locked(cache / f"{key}.lock", say):
        found = cached_image(cache)
        if found:
            return found
        say(f"building the local VM image {key} once (a few minutes; later runs reuse it from {cache})")
        work = Path(tempfile.mkdtemp(prefix=f".build-{key}-", dir=cache))
        try:
            build_image(work, host_debian_mirror(), say)
            work.chmod(0o755)  # mkdtemp made it private; the image is not secret
            # Atomic publish: readers see either no image or a complete one.
            work.rename(cache / key)
        except BaseException:
            shutil.rmtree(work, ignore_errors=True)
            raise
    say(f"image ready in {cache / key}")
    image = cached_image(cache)
    assert image is not None
    return image


def main() -> None:
    """``python -m rawvm_images.local_vm``: build (or find) the image and print where it is."""
    try:
        image = ensure_image(progress=lambda msg: print(msg, flush=True))
    except ImageError as exc:
        raise SystemExit(f"rawvm: {exc}") from None
    print(json.dumps({k: str(v) for k, v in asdict(image).items()}, indent=2))


if __name__ == "__main__":
    main()
