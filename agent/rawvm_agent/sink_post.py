"""The sink upload a laptop hands this machine over the API (``PUT /v1/sink``), instead of agent.toml.

On EC2 every machine of a cluster boots from one user-data (one launch template), which any process on the machine
can read through IMDS and any principal with EC2 read access through the API. An upload form there would let
whoever reads it write every machine's flushes for as long as it is valid. So the laptop signs one form per
machine, naming that machine's keys only and expiring when its backstop has powered it off, and hands it over the
authenticated API once the machine serves. It is kept here, 0600 in the agent's state dir under a dot name (the
flush leaves dot files out, so the form never travels in it), and reloaded after a restart. Its policy,
signature, credential and session token are added to the Redactor: they never reach a log.

A machine that never gets a form has no sink: it cannot upload, and its logs stay on it until it powers off.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

HANDED_FILE = ".sink-post.json"  # a dot name: Agent.sink_files never flushes it
MAX_FIELDS = 32
MAX_FIELD_CHARS = 16 << 10  # an S3 POST policy is a few KB of base64
SECRET_FIELD_PARTS = ("signature", "policy", "token", "credential")  # as good as a credential until they expire


class SinkPostError(ValueError):
    """A handed form that is not one (its message says why, without the values)."""


@dataclass(frozen=True)
class HandedSink:
    """Where to POST this machine's flushes, and the form fields to send before the file."""

    url: str
    fields: dict[str, str] = field(repr=False)


def secret_values(fields: Mapping[str, str]) -> list[str]:
    """The values of a presigned POST's fields that sign it (policy, signature, credential, session token)."""
    return [value for key, value in fields.items() if any(part in key.lower() for part in SECRET_FIELD_PARTS)]


def parse(body: Any) -> HandedSink:
    """``{"url": "https://...", "fields": {name: value}}`` as a HandedSink; SinkPostError when it is not one."""
    if not isinstance(body, dict) or set(body) != {"url", "fields"}:
        raise SinkPostError("the body must be JSON {url, fields}")
    url, fields = body["url"], body["fields"]
    if not isinstance(url, str) or urlsplit(url).scheme not in ("http", "https") or not urlsplit(url).netloc:
        raise SinkPostError("'url' must be an http(s) URL")
    if not isinstance(fields, dict) or not 0 < len(fields) <= MAX_FIELDS:
        raise SinkPostError(f"'fields' must be an object of 1 to {MAX_FIELDS} form fields")
    for key, value in fields.items():
        if not isinstance(value, str) or not key or len(key) + len(value) > MAX_FIELD_CHARS:
            raise SinkPostError(f"form field {key[:64]!r} must be a string of at most {MAX_FIELD_CHARS} characters")
    return HandedSink(url, dict(fields))


def save(state_dir: Path, sink: HandedSink) -> None:
    """Keep the form (0600, atomically) so a restarted agent still has it."""
    fd, tmp = tempfile.mkstemp(dir=state_dir, prefix=f"{HANDED_FILE}.")  # mkstemp: 0600
    try:
        with os.fdopen(fd, "w") as handle:
            json.dump({"url": sink.url, "fields": sink.fields}, handle)
        os.replace(tmp, state_dir / HANDED_FILE)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load(state_dir: Path) -> HandedSink | None:
    """The form handed before this agent (re)started; None when there is none (or it is damaged)."""
    try:
        return parse(json.loads((state_dir / HANDED_FILE).read_text()))
    except (OSError, ValueError):
        return None
