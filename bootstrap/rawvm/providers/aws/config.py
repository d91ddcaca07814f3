"""The aws provider's settings and its handling of boto3: the retry modes, the errors a call can raise, and the
settings file ``rawvm setup aws`` writes."""

from __future__ import annotations

import getpass
import os
import tomllib
from pathlib import Path

import tomli_w
from boto3.exceptions import Boto3Error
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError

# What a boto3 call can raise: an AWS error answer, a transport error, or boto3's own (S3 transfers wrap failures
# in S3UploadFailedError): each becomes one RawvmError line.
AWS_ERRORS = (ClientError, BotoCoreError, Boto3Error)
RETRY_CONFIG = Config(retries={"mode": "standard", "max_attempts": 10})
# A price is a nicety before a launch, not worth minutes of retries: a few quick tries, then "unknown".
PRICING_CONFIG = Config(retries={"mode": "standard", "max_attempts": 3}, connect_timeout=5, read_timeout=20)


def default_config_path() -> Path:
    """Where ``rawvm setup aws`` keeps its settings: ``$XDG_CONFIG_HOME/rawvm/aws.toml``."""
    base = Path(os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config")
    return base / "rawvm" / "aws.toml"


def read_settings(path: Path) -> dict[str, str]:
    """``rawvm setup aws`` writes the region and bucket here; both are defaults, flags win."""
    try:
        raw = tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError):
        return {}
    return {k: str(v) for k, v in raw.items() if k in ("region", "bucket")}


def write_settings(path: Path, settings: dict[str, str]) -> None:
    """Keep the settings ``rawvm setup aws`` chose (region, bucket) for later launches."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(tomli_w.dumps(settings))


def local_user() -> str:
    """The laptop user, for the ``rawvm:owner`` tag (sweeps and bills say whose machines they were)."""
    try:
        return getpass.getuser()
    except (OSError, KeyError):
        return "unknown"


def aws_error(exc: Exception) -> str:
    """One line for a boto3 failure: ``Code: Message`` for an AWS answer, else the exception's text."""
    if isinstance(exc, ClientError):
        error = exc.response.get("Error", {})
        return f"{error.get('Code', '?')}: {error.get('Message', '')}".rstrip(": ")
    return str(exc)
