"""Which version of a model a call gets: pure rules shared by the router and the zero-hop client."""

from __future__ import annotations

import hashlib
import random
from collections.abc import Collection, Mapping
from typing import Protocol, TypeVar

from modelyard.placement.model import RouteRule, version_order
from modelyard.router.errors import ModelNotFound


class _Visible(Protocol):
    def visible_to(self, tenant: str | None) -> bool: ...


V = TypeVar("V", bound=_Visible)


def split_point(model: str, request_id: str) -> float:
    """A point in [0, 1) fixed by the request id (random without one), for weighted splits."""
    if not request_id:
        return random.random()
    digest = hashlib.blake2b(f"{model}\0{request_id}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64


def choose_version(
    model: str,
    visible: Collection[str],
    *,
    requested: str = "",
    tenant: str | None = None,
    request_id: str = "",
    rule: RouteRule | None = None,
) -> str | None:
    """The version to serve among those the caller may see, or None when the requested one is not there.

    Precedence: an explicit version, the tenant's pin, the weighted split, the rule's default version,
    then the highest visible version. Pins, split entries and defaults naming versions the caller cannot
    see are skipped, never an error.
    """
    if not visible:
        return None
    if requested:
        return requested if requested in visible else None
    if rule is not None:
        pinned = dict(rule.tenant_versions).get(tenant or "")
        if pinned in visible:
            return pinned
        weights = [(v, w) for v, w in rule.weights if v in visible and w > 0]
        if weights:
            point = split_point(model, request_id) * sum(w for _, w in weights)
            for version, weight in weights:
                point -= weight
                if point < 0:
                    return version
            return weights[-1][0]
        if rule.default_version in visible:
            return rule.default_version
    return max(visible, key=version_order)


def resolve_version(
    name: str,
    versions: Mapping[str, V] | None,
    *,
    requested: str,
    tenant: str | None,
    request_id: str,
    rule: RouteRule | None,
) -> V:
    """The version of `name` (a model's or a pipeline's) a caller gets, by `choose_version`'s rules.

    Versions private to other tenants are invisible: asking for one is NOT_FOUND, exactly as for a name
    that does not exist, so callers cannot probe other tenants' models.
    """
    visible = {v: item for v, item in (versions or {}).items() if item.visible_to(tenant)}
    if not visible:
        raise ModelNotFound(f"model '{name}' is not registered")
    chosen = choose_version(
        name, visible, requested=requested, tenant=tenant, request_id=request_id, rule=rule
    )
    if chosen is None:
        raise ModelNotFound(f"model '{name}' has no version '{requested}'")
    return visible[chosen]
