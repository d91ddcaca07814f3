"""Real AWS prices, cached for a day: on-demand and storage from the Price List API, spot from EC2.

- On-demand instance $/hour: ``pricing.get_products`` (the Price List Query API, served from us-east-1) for
  AmazonEC2 with instanceType, regionCode, Linux, shared tenancy, no pre-installed software and capacitystatus
  ``Used``; each ``PriceList`` entry is a JSON string whose ``terms.OnDemand.*.priceDimensions.*.pricePerUnit.USD``
  is the price.
- Spot $/hour: ``ec2.describe_spot_price_history`` from now, the latest price per availability zone.
- EBS $/GB-month (productFamily ``Storage``, volumeApiName gp3, ...) and S3 Standard $/GB-month, the same way.

A price that cannot be had (no permission, no network, no product) is ``None`` -- shown as "unknown", never
guessed. Known prices are cached in ``<rawvm cache>/prices/<region>.json``, one entry per region and type, for
``PRICE_TTL_SECONDS``; failures are not cached on disk, so the next command asks again.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Iterable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from botocore.exceptions import BotoCoreError, ClientError

PRICE_TTL_SECONDS = 24 * 3600.0
HOURS_PER_MONTH = 730.0  # AWS's own convention for monthly estimates
PRICING_REGION = "us-east-1"  # the Price List Query API answers in us-east-1 (and ap-south-1, eu-central-1)
SPOT_PRODUCT = "Linux/UNIX"


def default_cache_dir() -> Path:
    """``$RAWVM_CACHE_DIR/prices``, else ``$XDG_CACHE_HOME/rawvm/prices``, else ``~/.cache/rawvm/prices``."""
    if env := os.environ.get("RAWVM_CACHE_DIR"):
        return Path(env) / "prices"
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "rawvm" / "prices"


def _term_match(fields: dict[str, str]) -> list[dict[str, str]]:
    return [{"Type": "TERM_MATCH", "Field": k, "Value": v} for k, v in fields.items()]


def instance_filters(region: str, instance_type: str) -> list[dict[str, str]]:
    return _term_match(
        {
            "instanceType": instance_type,
            "regionCode": region,
            "operatingSystem": "Linux",
            "tenancy": "Shared",
            "preInstalledSw": "NA",
            "capacitystatus": "Used",
        }
    )


def volume_filters(region: str, volume_type: str) -> list[dict[str, str]]:
    return _term_match({"productFamily": "Storage", "volumeApiName": volume_type, "regionCode": region})


def s3_filters(region: str) -> list[dict[str, str]]:
    return _term_match(
        {"productFamily": "Storage", "storageClass": "General Purpose", "volumeType": "Standard", "regionCode": region}
    )


def on_demand_usd(price_list: Iterable[str | dict[str, Any]], *, unit: str, usage_contains: str = "") -> float | None:
    """The on-demand USD price per ``unit`` in GetProducts' ``PriceList`` strings; None when there is none.

    Only the first tier (``beginRange`` 0) counts. Several matching products (rare: a filter that is not
    specific enough) give the highest price, so an estimate errs towards the bill, never below it. A price of
    0 is no price: it would make any cost cap meaningless."""
    found: list[float] = []
    for item in price_list:
        doc = json.loads(item) if isinstance(item, str) else item  # boto3 hands back JSON strings
        attributes = doc.get("product", {}).get("attributes", {})
        if usage_contains and usage_contains not in str(attributes.get("usagetype", "")):
            continue
        if attributes.get("marketoption", "OnDemand") != "OnDemand":  # e.g. capacity blocks
            continue
        for term in doc.get("terms", {}).get("OnDemand", {}).values():
            for dimension in term.get("priceDimensions", {}).values():
                if dimension.get("unit") != unit or str(dimension.get("beginRange", "0")) not in ("0", "0.0"):
                    continue
                usd = dimension.get("pricePerUnit", {}).get("USD")
                try:
                    value = float(usd)
                except (TypeError, ValueError):
                    continue
                if value > 0:
                    found.append(value)
    return max(found) if found else None


def latest_spot_prices(history: Iterable[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """instance type -> {zone: latest Linux spot $/hour} from DescribeSpotPriceHistory entries."""
    latest: dict[tuple[str, str], tuple[datetime, float]] = {}
    oldest = datetime.min.replace(tzinfo=UTC)
    for entry in history:
        if not str(entry.get("ProductDescription", "")).startswith(SPOT_PRODUCT):
            continue
        key = (str(entry["InstanceType"]), str(entry["AvailabilityZone"]))
        stamp = entry.get("Timestamp")
        when = stamp if isinstance(stamp, datetime) else oldest
        try:
            price = float(entry["SpotPrice"])
        except (KeyError, TypeError, ValueError):
            continue
        if key not in latest or when >= latest[key][0]:
            latest[key] = (when, price)
    out: dict[str, dict[str, float]] = {}
    for (instance_type, zone), (_, price) in sorted(latest.items()):
        out.setdefault(instance_type, {})[zone] = price
    return out


class PriceBook:
    """Prices for one AWS account's view, with a per-region disk cache.

    ``pricing`` gives the Price List client, or None when there is none to ask (then on-demand and storage
    prices are unknown unless cached); ``ec2`` gives a region's EC2 client (spot prices)."""

    def __init__(
        self,
        pricing: Callable[[], Any | None],
        ec2: Callable[[str], Any],
        *,
        cache_dir: Path | None = None,
        ttl: float = PRICE_TTL_SECONDS,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._pricing = pricing
        self._ec2 = ec2
        self.cache_dir = cache_dir or default_cache_dir()
        self.ttl = ttl
        self.clock = clock
        self._failed: set[tuple[str, str, str]] = set()  # asked this process already, no answer
        self._memo: dict[tuple[str, str, str], tuple[float, Any]] = {}  # (fetched at, value) read or fetched

    # -- the cache -------------------------------------------------------------------------------------------

    def _path(self, region: str) -> Path:
        return self.cache_dir / f"{region}.json"

    def _load(self, region: str) -> dict[str, Any]:
        try:
            raw = json.loads(self._path(region).read_text())
            return raw if isinstance(raw, dict) else {}
        except (OSError, ValueError):
            return {}

    def _cached(self, region: str, kind: str, key: str) -> tuple[bool, Any]:
        if (region, kind, key) not in self._memo:
            entry = self._load(region).get(kind, {}).get(key)
            if isinstance(entry, dict):
                self._memo[(region, kind, key)] = (float(entry.get("at", 0)), entry.get("value"))
        at, value = self._memo.get((region, kind, key), (0.0, None))
        if value is not None and self.clock() - at < self.ttl:
            return True, value
        return False, None

    def _store(self, region: str, kind: str, key: str, value: Any) -> None:
        self._memo[(region, kind, key)] = (self.clock(), value)
        data = self._load(region)
        data.setdefault(kind, {})[key] = {"value": value, "at": self.clock()}
        try:
            self.cache_dir.mkdir(parents=True, exist_ok=True)
            tmp = self._path(region).with_suffix(f".{os.getpid()}.tmp")
            tmp.write_text(json.dumps(data, sort_keys=True))
            tmp.replace(self._path(region))
        except OSError:
            pass  # an unwritable cache costs a lookup next time, nothing else

    # -- lookups ---------------------------------------------------------------------------------------------

    def _price_list(
        self, region: str, kind: str, key: str, service: str, filters: list[dict[str, str]], **parse: str
    ) -> float | None:
        if (region, kind, key) in self._failed:
            return None
        hit, value = self._cached(region, kind, key)
        if hit:
            return float(value)
        client = self._pricing()
        price = None
        if client is not None:
            try:
                pages = client.get_paginator("get_products").paginate(
                    ServiceCode=service, Filters=filters, FormatVersion="aws_v1"
                )
                price = on_demand_usd((item for page in pages for item in page.get("PriceList", [])), **parse)
            except (ClientError, BotoCoreError, ValueError):
                price = None
        if price is None:
            self._failed.add((region, kind, key))
            return None
        self._store(region, kind, key, price)
        return price

    def on_demand(self, region: str, instance_type: str) -> float | None:
        """Linux on-demand $/hour of ``instance_type`` in ``region``."""
        return self._price_list(
            region,
            "on-demand",
            instance_type,
            "AmazonEC2",
            instance_filters(region, instance_type),
            unit="Hrs",
            usage_contains="BoxUsage",
        )

    def volume_gb_month(self, region: str, volume_type: str) -> float | None:
        """EBS $/GB-month of ``volume_type`` (gp3, gp2, io1, ...) in ``region``."""
        return self._price_list(
            region, "ebs", volume_type, "AmazonEC2", volume_filters(region, volume_type), unit="GB-Mo"
        )

    def s3_gb_month(self, region: str) -> float | None:
        """S3 Standard $/GB-month (the first tier) in ``region``."""
        return self._price_list(region, "s3", "standard", "AmazonS3", s3_filters(region), unit="GB-Mo")

    def spot(self, region: str, instance_types: Iterable[str]) -> dict[str, dict[str, float]]:
        """instance type -> {zone: latest spot $/hour}; a type with no answer is absent."""
        wanted = sorted(set(instance_types))
        out: dict[str, dict[str, float]] = {}
        missing = []
        for name in wanted:
            hit, value = self._cached(region, "spot", name)
            if hit and isinstance(value, dict) and value:
                out[name] = {str(z): float(p) for z, p in value.items()}
            elif (region, "spot", name) not in self._failed:
                missing.append(name)
        if not missing:
            return out
        try:
            pages = (
                self._ec2(region)
                .get_paginator("describe_spot_price_history")
                .paginate(
                    InstanceTypes=missing,
                    ProductDescriptions=[SPOT_PRODUCT],
                    StartTime=datetime.fromtimestamp(self.clock(), UTC),
                )
            )
            fresh = latest_spot_prices(entry for page in pages for entry in page.get("SpotPriceHistory", []))
        except (ClientError, BotoCoreError):
            fresh = {}
        for name in missing:
            if fresh.get(name):
                out[name] = fresh[name]
                self._store(region, "spot", name, fresh[name])
            else:
                self._failed.add((region, "spot", name))
        return out

    def machine_hour(self, region: str, instance_type: str, *, spot: bool, zone: str = "") -> float | None:
        """$/hour of one machine: its zone's spot price (the highest zone's when the zone is not known), or the
        on-demand price."""
        if not spot:
            return self.on_demand(region, instance_type)
        zones = self.spot(region, [instance_type]).get(instance_type, {})
        if zone and zone in zones:
            return zones[zone]
        return max(zones.values()) if zones else None
