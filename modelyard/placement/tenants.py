"""Tenant limits: what one tenant may take of the fleet, kept in the store. Pure: no I/O.

A tenant's entry (or the default entry, for tenants without one) bounds its calls in flight and its call
rate (a token bucket: `rps` refill, `burst` deep) across the whole fleet, and gives its priority when it
waits for a saturated container. Every router enforces its share: the fleet-wide limit divided among the
live routers it sees (`share`). 0 means "no limit" for each number.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, replace
from typing import Any

from modelyard.placement.model import dataclass_json

PRIORITIES: tuple[str, ...] = ("high", "normal", "low")
# How much of a saturated container each priority gets when tenants compete (deficit round robin weights).
PRIORITY_WEIGHTS = {"high": 4, "normal": 2, "low": 1}
MAX_TENANT_NAME = 253


@dataclass(frozen=True)
class TenantLimits:
    max_inflight: int = 0  # calls (and open streams) in flight across the fleet; 0: no limit
    rps: float = 0.0  # calls per second across the fleet; 0: no limit
    burst: int = 0  # calls allowed at once above the rate; 0: one second's worth of `rps`
    priority: str = "normal"

    @property
    def limited(self) -> bool:
        return bool(self.max_inflight or self.rps)

    @property
    def weight(self) -> int:
        return PRIORITY_WEIGHTS.get(self.priority, PRIORITY_WEIGHTS["normal"])

    @property
    def bucket_depth(self) -> float:
        return float(self.burst) if self.burst else max(1.0, math.ceil(self.rps))

    def to_json(self) -> bytes:
        return dataclass_json(self)

    @classmethod
    def from_json(cls, raw: bytes | str) -> TenantLimits:
        """From untrusted JSON: unknown fields dropped, each known one checked (ValueError otherwise)."""
        data = json.loads(raw.decode() if isinstance(raw, bytes) else raw)
        if data.__class__ is not dict:
            raise ValueError(f"expected a JSON object, got {type(data).__name__}")
        values: dict[str, Any] = {}
        for name in ("max_inflight", "burst"):
            if name in data:
                value = data[name]
                if value.__class__ is not int or value < 0:
                    raise ValueError(f"{name}: expected a non-negative integer, got {value!r}")
                values[name] = value
        if "rps" in data:
            rps = data["rps"]
            if rps.__class__ not in (int, float) or not math.isfinite(rps) or rps < 0:
                raise ValueError(f"rps: expected a non-negative number, got {rps!r}")
            values["rps"] = float(rps)
        if "priority" in data:
            if data["priority"] not in PRIORITIES:
                choices = ", ".join(PRIORITIES)
                raise ValueError(f"priority: expected one of {choices}, got {data['priority']!r}")
            values["priority"] = data["priority"]
        return cls(**values)


NO_LIMITS = TenantLimits()


def check_tenant_name(name: str) -> str:
    """`name` if it can name a tenant in the store (ValueError otherwise)."""
    if not name or len(name) > MAX_TENANT_NAME or "/" in name or any(c.isspace() for c in name):
        raise ValueError(f"bad tenant name {name!r}: 1-{MAX_TENANT_NAME} characters, no '/' or spaces")
    return name


def parse_limits(
    base: TenantLimits,
    *,
    max_inflight: str | None = None,
    rps: str | None = None,
    burst: str | None = None,
    priority: str | None = None,
) -> TenantLimits:
    """`base` with the values given as text (a CLI's flags) replaced; ValueError naming the first bad one."""
    changes: dict[str, Any] = {}
    for flag, text, name in (("--max-inflight", max_inflight, "max_inflight"), ("--burst", burst, "burst")):
        if text is None:
            continue
        try:
            value = int(text)
        except ValueError:
            raise ValueError(f"bad {flag} {text!r}: expected a positive integer") from None
        if value <= 0:
            raise ValueError(f"bad {flag} {text!r}: expected a positive integer")
        changes[name] = value
    if rps is not None:
        try:
            rate = float(rps)
        except ValueError:
            raise ValueError(f"bad --rps {rps!r}: expected a positive number of calls per second") from None
        if not math.isfinite(rate) or rate <= 0:
            raise ValueError(f"bad --rps {rps!r}: expected a positive number of calls per second")
        changes["rps"] = rate
    if priority is not None:
        if priority not in PRIORITIES:
            raise ValueError(f"bad --priority {priority!r}: expected one of {', '.join(PRIORITIES)}")
        changes["priority"] = priority
    if not changes:
        raise ValueError("nothing to set: give --max-inflight, --rps, --burst or --priority")
    return replace(base, **changes)


def router_share(total: int, routers: int) -> int:
    """One router's part of a fleet-wide count (0: no limit): rounded up, so every router admits at least
    one call; the fleet may then admit up to `routers - 1` more than `total`."""
    if not total:
        return 0
    return max(1, -(-total // max(1, routers)))


def share(limits: TenantLimits, routers: int) -> TenantLimits:
    """What one of `routers` live routers enforces of the fleet-wide `limits`."""
    routers = max(1, routers)
    if routers == 1:
        return limits
    return replace(
        limits,
        max_inflight=router_share(limits.max_inflight, routers),
        rps=limits.rps / routers,
        burst=max(1, math.ceil(limits.bucket_depth / routers)) if limits.rps else limits.burst,
    )
