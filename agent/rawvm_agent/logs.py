"""Logging for the agent, with secrets redacted from every line and every task log.

The bearer token and the values of env vars marked secret (``secret_env`` in agent.toml and in each task
request) must never reach a log file, stderr, or the sink. Redaction happens at the formatter, the last
step before a line is written, so it covers messages, arguments and tracebacks alike.
"""

from __future__ import annotations

import logging
import sys
import threading
from collections.abc import Iterable
from pathlib import Path
from urllib.parse import urlsplit

MASK = "***"
# Shorter values would mask ordinary words and digits everywhere, and leak little on their own.
MIN_SECRET_LEN = 4


class Redactor:
    """The set of secret strings; replaces each occurrence with ``***``. Thread-safe, grows only."""

    def __init__(self, secrets: Iterable[str] = ()) -> None:
        self._lock = threading.Lock()
        self._secrets: tuple[str, ...] = ()
        self.add(*secrets)

    def add(self, *values: str) -> None:
        with self._lock:
            merged = set(self._secrets) | {v for v in values if v and len(v) >= MIN_SECRET_LEN}
            # Longest first, so a secret containing another is masked whole.
            self._secrets = tuple(sorted(merged, key=lambda s: (-len(s), s)))

    @property
    def secrets(self) -> tuple[str, ...]:
        return self._secrets

    def redact(self, text: str) -> str:
        for secret in self._secrets:
            if secret in text:
                text = text.replace(secret, MASK)
        return text


def url_password(url: str) -> str:
    """The password in ``https://user:pass@host/…`` (index URLs may carry credentials), else ``""``."""
    try:
        return urlsplit(url).password or ""
    except ValueError:
        return ""


class RedactingFormatter(logging.Formatter):
    def __init__(self, redactor: Redactor, fmt: str | None = None) -> None:
        super().__init__(fmt=fmt)
        self.redactor = redactor

    def format(self, record: logging.LogRecord) -> str:
        return self.redactor.redact(super().format(record))


class StreamRedactor:
    """Masks secrets in a byte stream that arrives in chunks (a task's stdout/stderr).

    A secret may straddle two chunks, so the tail that could still be the start of a secret is held back
    until the next chunk or ``flush``.
    """

    def __init__(self, redactor: Redactor) -> None:
        self._redactor = redactor
        self._pending = b""

    def feed(self, chunk: bytes) -> bytes:
        secrets = [s.encode() for s in self._redactor.secrets]
        data = self._pending + chunk
        if not secrets:
            self._pending = b""
            return data
        for secret in secrets:
            data = data.replace(secret, MASK.encode())
        keep = _longest_secret_prefix_suffix(data, secrets)
        self._pending = data[len(data) - keep :] if keep else b""
        return data[: len(data) - keep]

    def flush(self) -> bytes:
        data, self._pending = self._pending, b""
        return data


def _longest_secret_prefix_suffix(data: bytes, secrets: list[bytes]) -> int:
    """Length of the longest suffix of ``data`` that is a proper prefix of some secret."""
    best = 0
    for secret in secrets:
        for n in range(min(len(secret) - 1, len(data)), best, -1):
            if data.endswith(secret[:n]):
                best = n
                break
    return best


LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def setup_logging(redactor: Redactor, log_file: Path | None, level: int = logging.INFO) -> None:
    """Route the root logger to stderr and ``log_file``, both through the redacting formatter."""
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
        handler.close()
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stderr)]
    if log_file is not None:
        log_file.parent.mkdir(parents=True, exist_ok=True)
        handlers.append(logging.FileHandler(log_file, encoding="utf-8"))
    for handler in handlers:
        handler.setFormatter(RedactingFormatter(redactor, LOG_FORMAT))
        root.addHandler(handler)
    root.setLevel(level)
    # aiohttp's access log names paths and peers only, but keep it quiet: monitoring polls every second.
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
