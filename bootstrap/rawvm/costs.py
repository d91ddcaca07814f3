"""What a launched cluster costs so far, from its record: each machine's price times its time up.

(``cost_guard`` is the other half: the price of a launch before it happens, and the cap on it.)
"""

from __future__ import annotations

from rawvm.clusters import ClusterRecord
from rawvm.options import BACKSTOP_GRACE
from rawvm.providers import FREE_PROVIDERS


def cost_of(record: ClusterRecord, until: float) -> float:
    """USD so far: each machine's price x the time since its launch, at most its lifetime (+ the backstop's
    grace) when the record knows it, since no machine runs longer."""
    limit = record.max_lifetime_s + BACKSTOP_GRACE if record.max_lifetime_s else float("inf")
    return sum(m.price_per_hour * min(limit, max(0.0, until - m.launched_at)) / 3600.0 for m in record.machines)


def price_unknown(record: ClusterRecord) -> bool:
    """A billed provider's machine whose price could not be had (its price_per_hour is 0)."""
    return record.provider not in FREE_PROVIDERS and any(m.price_per_hour == 0 for m in record.machines)


def cost_line(record: ClusterRecord, cost: float) -> str:
    """``cost so far: $0.5000 at $1.0000/h``, or why there is no figure (free provider, no price)."""
    if record.provider in FREE_PROVIDERS:
        return f"cost: free ({record.provider})"
    if record.price_per_hour == 0:
        return "cost: unknown (no price could be read)"
    unknown = " + machines of unknown price" if price_unknown(record) else ""
    return f"cost so far: ${cost:.4f} at ${record.price_per_hour:.4f}/h{unknown}"
