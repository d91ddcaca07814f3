"""Prometheus text exposition format 0.0.4: one ``family`` call per metric family.

Names carry their unit (``_bytes``, ``_seconds``, ``_watts``…); counters end in ``_total``; every family has
HELP and TYPE lines; label values and HELP text are escaped as the format requires. AGENT-CORE renders its own
families (phase, tasks, idle clock) with the same ``family`` helper so the whole page stays valid.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

Labels = Mapping[str, str]
MetricSample = tuple[Labels, float]

_METRIC_NAME = re.compile(r"^[a-zA-Z_:][a-zA-Z0-9_:]*$")
_LABEL_NAME = re.compile(r"^[a-zA-Z_][a-zA-Z0-9_]*$")
_TYPES = frozenset({"counter", "gauge", "untyped"})
NO_LABELS: Labels = {}


def escape_label_value(value: str) -> str:
    """Backslash, double quote and newline must be escaped inside a label value."""
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def escape_help(text: str) -> str:
    """HELP text escapes only backslash and newline (a double quote stays as is)."""
    return text.replace("\\", "\\\\").replace("\n", "\\n")


def format_value(value: float) -> str:
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, int):
        return str(value)
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return repr(float(value))


def format_labels(labels: Labels) -> str:
    if not labels:
        return ""
    parts = []
    for key, value in labels.items():
        if not _LABEL_NAME.match(key) or key.startswith("__"):
            raise ValueError(f"invalid Prometheus label name {key!r}")
        parts.append(f'{key}="{escape_label_value(str(value))}"')
    return "{" + ",".join(parts) + "}"


def family(name: str, type: str, help: str, samples: Iterable[MetricSample]) -> str:
    """One metric family as exposition text ending in a newline; ``""`` when it has no samples.

    ``samples`` are ``(labels, value)`` pairs. Histograms and summaries are not needed here, so only counter,
    gauge and untyped are accepted; a counter's name must end in ``_total``.
    """
    if not _METRIC_NAME.match(name):
        raise ValueError(f"invalid Prometheus metric name {name!r}")
    if type not in _TYPES:
        raise ValueError(f"unsupported metric type {type!r} for {name}; use one of {sorted(_TYPES)}")
    if (type == "counter") != name.endswith("_total"):
        raise ValueError(f"{name}: counters, and only counters, end in '_total'")
    lines = [f"{name}{format_labels(labels)} {format_value(value)}" for labels, value in samples]
    if not lines:
        return ""
    return f"# HELP {name} {escape_help(help)}\n# TYPE {name} {type}\n" + "\n".join(lines) + "\n"


def gauge(name: str, help: str, value: float | None, labels: Labels = NO_LABELS) -> str:
    """A family with one sample; nothing when the value is unknown."""
    return "" if value is None else family(name, "gauge", help, [(labels, value)])


def counter(name: str, help: str, value: float | None, labels: Labels = NO_LABELS) -> str:
    return "" if value is None else family(name, "counter", help, [(labels, value)])
