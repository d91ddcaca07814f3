"""Flush logs and telemetry to the configured sink before the machine powers off.

The sink (``agent.toml`` top-level ``sink``) is one of:

- empty: nothing to do;
- a directory (a plain path or a ``file://`` URL): the files are copied into ``<sink>/<label>-<UTC time>/``;
- an ``http(s)://`` URL, typically a presigned S3 PUT URL: one object, so the files are bundled into one
  ``.tar.gz`` (members under ``<label>-<UTC time>/``) and PUT with a Content-Length (S3 refuses chunked
  uploads) and no Content-Type, so the URL must be presigned without one;
- the same URL with form fields: an S3 presigned POST (``sink_form`` in agent.toml, or, on EC2, the form the
  laptop hands this machine alone over the API: ``sink_post``). The tar.gz goes as ``multipart/form-data``: the
  fields first, in their order, then the file last as field ``file`` named ``<label>-<UTC time>.tar.gz`` (S3
  ignores fields after the file), which fills the key's ``${filename}`` under the machine's own prefix.

Paths inside the destination are relative to the files' common parent directory; a directory among the
files is taken whole. Nothing here raises: every error is logged and the stop sequence goes on, because
the machine must power off whether or not its logs got out. Blocking work runs in a thread so the event
loop keeps feeding the systemd watchdog. URLs are logged without their query (presigned signatures), and
form fields (a POST policy and its signature) never.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import shutil
import socket
import tarfile
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, BinaryIO
from urllib.parse import urlsplit, urlunsplit
from urllib.request import url2pathname

import aiohttp

log = logging.getLogger(__name__)

PUT_ATTEMPTS = 3
RETRY_DELAY = 2.0  # seconds, times the attempt number
DEFAULT_TIMEOUT = 600.0  # the whole flush; the power-off waits for it


async def flush(
    sink: str,
    files: Sequence[Path],
    *,
    label: str = "",
    timeout: float = DEFAULT_TIMEOUT,
    form: Mapping[str, str] | None = None,
) -> None:
    """Send ``files`` to ``sink``; ``label`` (default: the host name) names the subdir / tar prefix.

    ``form``: the fields of an HTTP POST upload (an S3 presigned POST); without them an http(s) sink is PUT.
    """
    if not sink:
        log.info("sink: none configured, nothing flushed")
        return
    name = _bundle_name(label or socket.gethostname())
    fields = dict(form or {})
    try:
        await asyncio.wait_for(_flush(sink, files, name, fields), timeout)
    except TimeoutError:
        log.error("sink: flush to %s gave up after %gs", _public(sink), timeout)
    except Exception as exc:  # the machine powers off regardless
        log.error("sink: flush to %s failed: %s", _public(sink), _scrub(_describe(exc), sink, fields))


async def _flush(sink: str, files: Sequence[Path], name: str, fields: dict[str, str]) -> None:
    members = _members(files)
    scheme = urlsplit(sink).scheme.lower()
    if scheme in ("http", "https"):
        await _upload_tarball(sink, members, name, fields)
        return
    if fields:
        log.warning("sink: form fields are for an http(s):// sink (a presigned POST); ignored for %s", _public(sink))
    if scheme == "file":
        await asyncio.to_thread(_copy_tree, Path(url2pathname(urlsplit(sink).path)), members, name)
    elif scheme == "":
        await asyncio.to_thread(_copy_tree, Path(sink), members, name)
    else:
        log.error("sink: unsupported sink %s: use a directory, file:// or http(s):// (presigned PUT) URL", sink)


def _members(files: Sequence[Path]) -> list[tuple[Path, str]]:
    """(source, relative destination) for each file that exists, relative to their common parent."""
    present: list[Path] = []
    for file in files:
        if file.exists():
            present.append(file.resolve())
        else:
            log.warning("sink: %s does not exist, skipped", file)
    if not present:
        return []
    root = Path(os.path.commonpath([p.parent for p in present]))
    return [(p, p.relative_to(root).as_posix()) for p in present]


def _bundle_name(label: str) -> str:
    safe = re.sub(r"[^A-Za-z0-9._-]+", "-", label).strip("-.") or "machine"
    return f"{safe}-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}"


def _copy_tree(directory: Path, members: list[tuple[Path, str]], name: str) -> None:
    destination = directory / name
    destination.mkdir(parents=True, exist_ok=True)
    for source, relative in members:
        target = destination / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            if source.is_dir():
                shutil.copytree(source, target, dirs_exist_ok=True)
            else:
                shutil.copy2(source, target)
        except OSError as exc:  # one unreadable file must not cost the others
            log.error("sink: could not copy %s: %s", source, exc)
    log.info("sink: %d item(s) copied to %s", len(members), destination)


def _write_tarball(path: Path, members: list[tuple[Path, str]], name: str) -> None:
    with tarfile.open(path, "w:gz") as tar:
        for source, relative in members:
            try:
                tar.add(source, arcname=f"{name}/{relative}")
            except OSError as exc:
                log.error("sink: could not archive %s: %s", source, exc)


async def _upload_tarball(url: str, members: list[tuple[Path, str]], name: str, fields: dict[str, str]) -> None:
    method = "POST" if fields else "PUT"
    with tempfile.TemporaryDirectory(prefix="rawvm-sink-") as scratch:
        tarball = Path(scratch) / f"{name}.tar.gz"
        await asyncio.to_thread(_write_tarball, tarball, members, name)
        size = tarball.stat().st_size
        async with aiohttp.ClientSession() as session:
            for attempt in range(1, PUT_ATTEMPTS + 1):
                try:
                    with tarball.open("rb") as body:
                        request = _post_request(body, fields) if fields else _put_request(body, size)
                        async with session.request(method, url, **request) as response:
                            if response.status < 300:
                                log.info("sink: %d bytes %s to %s", size, method, _public(url))
                                return
                            detail = (await response.text())[:300]
                            raise aiohttp.ClientResponseError(
                                response.request_info, (), status=response.status, message=detail
                            )
                except aiohttp.ClientError as exc:
                    reason = _scrub(_describe(exc), url, fields)
                    log.warning(
                        "sink: %s to %s, attempt %d/%d: %s", method, _public(url), attempt, PUT_ATTEMPTS, reason
                    )
                    if attempt < PUT_ATTEMPTS:
                        await asyncio.sleep(RETRY_DELAY * attempt)
        log.error(
            "sink: %s to %s failed %d times; logs and telemetry stay on this machine",
            method,
            _public(url),
            PUT_ATTEMPTS,
        )


def _put_request(body: BinaryIO, size: int) -> dict[str, Any]:
    return {
        "data": body,
        "headers": {"Content-Length": str(size)},
        # No Content-Type: a presigned URL that names one signs it (SigV4 as a signed header, SigV2 in the
        # string to sign), and S3 refuses a PUT whose headers differ from the signature.
        "skip_auto_headers": ("Content-Type",),
    }


def _post_request(body: BinaryIO, fields: dict[str, str]) -> dict[str, Any]:
    form = aiohttp.FormData()
    for key, value in fields.items():
        form.add_field(key, value)
    # Last: S3 reads the fields up to the file and ignores what follows it. The file name fills ${filename}.
    # A file object has a known size, so the body goes with a Content-Length (S3 refuses chunked uploads).
    form.add_field("file", body, filename=Path(body.name).name, content_type="application/gzip")
    return {"data": form}


def _public(url: str) -> str:
    """The URL without credentials: no user info, query or fragment (a presigned URL's query signs it)."""
    parts = urlsplit(url)
    if not parts.scheme:
        return url
    return urlunsplit((parts.scheme, parts.netloc.rpartition("@")[2], parts.path, "", ""))


def _describe(exc: BaseException) -> str:
    if isinstance(exc, aiohttp.ClientResponseError):  # its str() carries the whole URL
        return f"HTTP {exc.status}: {exc.message}"
    return f"{type(exc).__name__}: {exc}"


def _scrub(text: str, url: str, fields: Mapping[str, str] | None = None) -> str:
    """``text`` with any copy of ``url``'s query (and user info) and of the form fields' values removed."""
    parts = urlsplit(url)
    for secret in (parts.query, parts.username or "", parts.password or "", *(fields or {}).values()):
        if secret:
            text = text.replace(secret, "<redacted>")
    return text
