"""Admission: a tenant's calls over its limits are refused before any upstream work.

Each router enforces its share of every tenant's fleet-wide limits (placement/tenants.py): calls and open
streams in flight, and a token bucket for the call rate. A call over either is refused at once with
RESOURCE_EXHAUSTED, a message naming the limit, and the `grpc-retry-pushback-ms` trailer (when a retrying
client may try again). Nothing waits here: a queue in front of a limit only turns refusals into timeouts.

The decision is `take_token` (pure) and two integer compares; with no tenant limited anywhere the call
path pays one attribute read.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from modelyard.errors import ResourceExhausted
from modelyard.placement.registry import Changes, Fleet
from modelyard.placement.tenants import NO_LIMITS, PRIORITY_WEIGHTS, TenantLimits, share

PUSHBACK_TRAILER = "grpc-retry-pushback-ms"
MAX_TENANT_STATES = 4096  # tenants with a live state: anyone can name a tenant in a trusted header
DEFAULT_WEIGHT = PRIORITY_WEIGHTS["normal"]
MIN_PUSHBACK_MS = 1
ANONYMOUS = "-"  # how callers without a tenant are named in messages and metrics


class Overloaded(ResourceExhausted):
    """A call refused because a limit is reached: the caller may retry after `pushback_ms` (None: no hint)."""

    def __init__(self, message: str, pushback_ms: int | None = None, *, limit: str = "") -> None:
        super().__init__(message)
        self.pushback_ms = pushback_ms
        self.limit = limit  # which limit refused it (a metric label): inflight, rps, queue, deadline
        self.trailers: tuple[tuple[str, str], ...] = (
            ((PUSHBACK_TRAILER, str(max(MIN_PUSHBACK_MS, pushback_ms))),) if pushback_ms is not None else ()
        )


def take_token(tokens: float, elapsed_s: float, rate: float, depth: float) -> tuple[float, float]:
    """One call against a token bucket holding `tokens`, refilled at `rate` per second for `elapsed_s`
    (at most `depth` held): (tokens left, 0.0) when it may go, (tokens left, seconds until it could) if
    not. Pure."""
    tokens = min(depth, tokens + max(0.0, elapsed_s) * rate)
    if tokens >= 1.0:
        return tokens - 1.0, 0.0
    return tokens, (1.0 - tokens) / rate


@dataclass(slots=True)
class Refusals:
    """Callers refused for one limit lately, counted as the callers still waiting for it: the count decays
    over the last push-back given (at least one `unit_s`), since a caller told to wait that long is still
    waiting. Push-backs built on it spread refused callers out; one unit alone brings them all back at
    once, to be refused again (each refusal costs the router a call's receive and send)."""

    count: float = 0.0
    at: float = 0.0
    pushback_s: float = 0.0

    def add(self, now: float, unit_s: float) -> float:
        """One more refusal at `now`; returns the callers waiting, this one included."""
        window_s = max(unit_s, self.pushback_s)
        self.count = self.count * math.exp(-(now - self.at) / window_s) + 1
        self.at = now
        return self.count

    def told(self, pushback_s: float) -> float:
        self.pushback_s = pushback_s
        return pushback_s


def inflight_pushback_s(state: TenantState, now: float) -> float:
    """When a caller refused for the tenant's in-flight limit should try again: a slot frees about every
    `call_s / max_inflight`, and the callers waiting queue for the slots too."""
    waiting = state.inflight_refusals.add(now, state.call_s)
    return state.inflight_refusals.told(state.call_s * (1.0 + waiting / max(1, state.limits.max_inflight)))


def rate_pushback_s(state: TenantState, wait_s: float, now: float) -> float:
    """When a caller refused for the tenant's rate limit should try again: when the next token comes
    (`wait_s`), plus one token's time for each other caller waiting for tokens (16 callers at --rps 100
    told only `wait_s` made 900 refusals a second)."""
    per_token_s = 1.0 / state.limits.rps
    waiting = state.rate_refusals.add(now, per_token_s)
    return state.rate_refusals.told(wait_s + (waiting - 1) * per_token_s)


@dataclass(slots=True)
class TenantState:
    """One limited tenant's calls at this router."""

    name: str
    limits: TenantLimits  # this router's share
    inflight: int = 0
    tokens: float = 0.0
    refilled_at: float = 0.0
    call_s: float = 0.01  # running mean of its calls' duration
    inflight_refusals: Refusals = field(default_factory=Refusals)
    rate_refusals: Refusals = field(default_factory=Refusals)


class Admission:
    """Per-tenant in-flight counts and token buckets at this router, following the limits in the store."""

    def __init__(self, *, enabled: bool = True, refused_counter: Any = None) -> None:
        """`refused_counter`: the metric refusals are added to (an OpenTelemetry counter), if any."""
        self.refused_counter = refused_counter
        self.enabled = enabled  # False: nothing is refused, nothing is counted (MODELYARD_ADMISSION=off)
        self.active = False  # some tenant (or the default) has a limit: the call path checks
        self.routers = 1  # live routers sharing the fleet-wide limits (this one included)
        self.fleet_limits: dict[str, TenantLimits] = {}
        self.fleet_default: TenantLimits | None = None
        self._limits: dict[str, TenantLimits] = {}  # this router's share, by tenant
        self._default: TenantLimits | None = None
        self._states: dict[str, TenantState] = {}
        # (tenant, limit) -> calls refused; the tenant is named only if it has an entry (bounded labels)
        self.refused: dict[tuple[str, str], int] = {}

    # -- following the store ---------------------------------------------------------------------------

    def on_change(self, fleet: Fleet, changes: Changes) -> None:
        """A store follower listener: new limits or live routers take effect for the next call."""
        if not (changes.everything or changes.tenants):
            return
        self.update(fleet.tenants, fleet.tenant_default, len(fleet.routers))

    def update(self, limits: dict[str, TenantLimits], default: TenantLimits | None, routers: int) -> None:
        self.fleet_limits = dict(limits)
        self.fleet_default = default
        self.routers = max(1, routers)
        self._limits = {tenant: share(entry, self.routers) for tenant, entry in limits.items()}
        self._default = share(default, self.routers) if default is not None else None
        self.active = self.enabled and (
            any(entry.limited for entry in limits.values()) or (default is not None and default.limited)
        )
        for state in self._states.values():
            state.limits = self.limits_of(state.name)
            state.tokens = min(state.tokens, state.limits.bucket_depth)

    def limits_of(self, tenant: str | None) -> TenantLimits:
        """This router's share of `tenant`'s limits (its entry, else the default, else none)."""
        entry = self._limits.get(tenant or ANONYMOUS)
        if entry is None:
            entry = self._default or NO_LIMITS
        return entry

    def fleet_limits_of(self, tenant: str | None) -> TenantLimits:
        entry = self.fleet_limits.get(tenant or ANONYMOUS)
        return entry if entry is not None else (self.fleet_default or NO_LIMITS)

    def weight(self, tenant: str | None) -> int:
        """The tenant's weight when it waits for a saturated container (its priority)."""
        if not self._limits and self._default is None:
            return DEFAULT_WEIGHT
        return self.limits_of(tenant).weight

    def is_limited(self, tenant: str | None) -> bool:
        return self.active and self.limits_of(tenant).limited

    # -- the call path ---------------------------------------------------------------------------------

    def enter(self, tenant: str | None) -> tuple[TenantState, float] | None:
        """Admits one call (or stream) of `tenant`, or raises Overloaded. Returns what `leave` takes (None
        when the tenant has no limit). Callers check `active` first: with nobody limited, skip the call."""
        name = tenant or ANONYMOUS
        state = self._states.get(name)
        if state is None:
            limits = self.limits_of(tenant)
            if not limits.limited:
                return None
            state = self._new_state(name, limits)
        limits = state.limits
        if not limits.limited:
            return None
        now = time.monotonic()
        if limits.max_inflight and state.inflight >= limits.max_inflight:
            self._refuse(name, "inflight")
            raise Overloaded(
                f"tenant '{name}' is at its limit of {limits.max_inflight} calls in flight at this router "
                f"(max-inflight {self.fleet_limits_of(tenant).max_inflight} across {self.routers} routers)",
                math.ceil(inflight_pushback_s(state, now) * 1000),
                limit="inflight",
            )
        if limits.rps:
            elapsed_s = now - state.refilled_at
            tokens, wait_s = take_token(state.tokens, elapsed_s, limits.rps, limits.bucket_depth)
            state.tokens, state.refilled_at = tokens, now
            if wait_s:
                self._refuse(name, "rps")
                raise Overloaded(
                    f"tenant '{name}' is over its rate limit of {limits.rps:g} calls/s at this router "
                    f"(rps {self.fleet_limits_of(tenant).rps:g} across {self.routers} routers, "
                    f"burst {limits.bucket_depth:g})",
                    math.ceil(rate_pushback_s(state, wait_s, now) * 1000),
                    limit="rps",
                )
        state.inflight += 1
        return state, now

    def leave(self, ticket: tuple[TenantState, float]) -> None:
        state, started = ticket
        state.inflight -= 1
        state.call_s += (time.monotonic() - started - state.call_s) * 0.1

    @contextlib.contextmanager
    def admitted(self, tenant: str | None) -> Iterator[None]:
        """Holds one admission for a block: a stream, a pipeline call."""
        ticket = self.enter(tenant) if self.active else None
        try:
            yield
        finally:
            if ticket is not None:
                self.leave(ticket)

    def inflight(self, tenant: str | None) -> int:
        state = self._states.get(tenant or ANONYMOUS)
        return state.inflight if state is not None else 0

    def _new_state(self, name: str, limits: TenantLimits) -> TenantState:
        if len(self._states) >= MAX_TENANT_STATES:
            # Tenants with nothing in flight lose their state (a full bucket again): bounded memory.
            self._states = {n: s for n, s in self._states.items() if s.inflight}
        state = self._states[name] = TenantState(
            name, limits, tokens=limits.bucket_depth, refilled_at=time.monotonic()
        )
        return state

    def _refuse(self, tenant: str, limit: str) -> None:
        self.count_refusal(tenant, limit)

    def count_refusal(self, tenant: str | None, limit: str) -> None:
        key = (self.label(tenant), limit)
        self.refused[key] = self.refused.get(key, 0) + 1
        if self.refused_counter is not None:
            self.refused_counter.add(1, {"tenant": key[0], "limit": limit})

    def label(self, tenant: str | None) -> str:
        """The tenant as a metric label: named if it has an entry in the store, else `other`."""
        name = tenant or ANONYMOUS
        return name if name in self._limits else "other"
