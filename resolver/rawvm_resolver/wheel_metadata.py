"""A wheel's METADATA without downloading the wheel: HTTP range requests into the zip, as pip's lazy wheel does.

Indexes serve the metadata beside the wheel (PEP 658) for most new uploads but not all (tensorflow 2.12.0's
wheels have none), and PyPI's JSON API may be out of reach behind a mirror-only proxy. A zip's central
directory sits at its end, so a few ranges of a few KiB find and read ``*.dist-info/METADATA``.
"""

from __future__ import annotations

import email.parser
import io
import zipfile

from rawvm_resolver.availability import IndexFile
from rawvm_resolver.index_http import TransportError, client

_BLOCK = 64 * 1024


class RangeFile(io.RawIOBase):
    """A read-only, seekable view of a remote file, fetched in blocks by HTTP Range requests."""

    def __init__(self, url: str, timeout: float = 60) -> None:
        self.url, self.timeout, self.position = url, timeout, 0
        self.blocks: dict[int, bytes] = {}
        response = client().request("HEAD", url, timeout=timeout)
        if response.status != 200:
            raise OSError(f"{url}: HTTP {response.status}")
        self.size = int(response.headers["Content-Length"])

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.position

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self.position, io.SEEK_END: self.size}[whence]
        self.position = max(0, base + offset)
        return self.position

    def readinto(self, buffer: bytearray | memoryview) -> int:  # type: ignore[override]
        end = min(self.position + len(buffer), self.size)
        data = b"".join(self._block(index) for index in range(self.position // _BLOCK, (end - 1) // _BLOCK + 1))
        start = self.position - (self.position // _BLOCK) * _BLOCK
        chunk = data[start : start + end - self.position] if end > self.position else b""
        buffer[: len(chunk)] = chunk
        self.position += len(chunk)
        return len(chunk)

    def _block(self, index: int) -> bytes:
        if index not in self.blocks:
            first, last = index * _BLOCK, min((index + 1) * _BLOCK, self.size) - 1
            response = client().get(self.url, headers={"Range": f"bytes={first}-{last}"}, timeout=self.timeout)
            if response.status != 206:
                raise OSError(f"{self.url}: the server ignored the range request")
            self.blocks[index] = response.body
        return self.blocks[index]


def wheel_requirements(file: IndexFile) -> list[str]:
    """The Requires-Dist lines of an index's wheel: from the metadata file served beside it (PEP 658), else read
    out of the remote wheel by range requests; [] when neither works (uv still decides)."""
    url = file.url.split("#", 1)[0]
    if not url.startswith(("https://", "http://")):
        return []
    if file.metadata:
        try:
            response = client().get(f"{url}.metadata")
        except (TransportError, OSError):
            response = None
        if response is not None and response.status == 200:
            return _requires_dist(response.body.decode("utf-8", errors="replace"))
    return remote_wheel_requirements(url) or []


def remote_wheel_requirements(url: str) -> list[str] | None:
    """The Requires-Dist lines of the wheel at ``url``; None when it cannot be read that way."""
    try:
        with zipfile.ZipFile(io.BufferedReader(RangeFile(url), buffer_size=_BLOCK)) as wheel:
            names = [name for name in wheel.namelist() if name.count("/") == 1 and name.endswith(".dist-info/METADATA")]
            if len(names) != 1:
                return None
            text = wheel.read(names[0]).decode("utf-8", errors="replace")
    except (TransportError, OSError, zipfile.BadZipFile, KeyError, ValueError):
        return None
    return _requires_dist(text)


def _requires_dist(metadata: str) -> list[str]:
    message = email.parser.Parser().parsestr(metadata, headersonly=True)
    return [str(value) for value in message.get_all("Requires-Dist") or []]
