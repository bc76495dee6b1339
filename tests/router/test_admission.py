"""Admission decisions without servers: the token bucket, in-flight counts, shares among routers."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given
from hypothesis import strategies as st

from modelyard.placement import registry
from modelyard.placement.registry import Fleet
from modelyard.placement.store.base import Event
from modelyard.placement.tenants import TenantLimits
from modelyard.router.admission import (
    PUSHBACK_TRAILER,
    Admission,
    Overloaded,
    TenantState,
    inflight_pushback_s,
    take_token,
)


@given(
    st.floats(min_value=0.1, max_value=1000),
    st.integers(min_value=1, max_value=50),
    st.lists(st.floats(min_value=0, max_value=0.5), min_size=1, max_size=200),
)
def test_a_token_bucket_admits_no_more_than_its_depth_plus_the_rate_over_time(
    rate: float, depth: int, gaps: list[float]
) -> None:
    tokens, admitted = float(depth), 0
    for gap in gaps:
        tokens, wait_s = take_token(tokens, gap, rate, depth)
        assert 0 <= tokens <= depth
        if wait_s == 0:
            admitted += 1
        else:
            assert wait_s <= 1 / rate + 1e-9  # a refusal says when one token will be there
    assert admitted <= depth + rate * sum(gaps) + 1e-6


def test_a_refused_call_is_told_when_the_next_token_comes() -> None:
    tokens, wait_s = take_token(0.0, 0.0, 10.0, 5)
    assert wait_s == pytest.approx(0.1)
    tokens, wait_s = take_token(tokens, 0.1, 10.0, 5)
    assert wait_s == 0 and tokens == pytest.approx(0.0)


def admission(
    limits: dict[str, TenantLimits], default: TenantLimits | None = None, routers: int = 1
) -> Admission:
    gate = Admission()
    gate.update(limits, default, routers)
    return gate


def test_nobody_limited_means_the_call_path_skips_admission() -> None:
    gate = admission({"acme": TenantLimits(priority="high")})
    assert not gate.active
    assert gate.enter("acme") is None


def test_in_flight_limit_refuses_with_resource_exhausted_naming_it_and_a_pushback() -> None:
    gate = admission({"noisy": TenantLimits(max_inflight=2)})
    tickets = [gate.enter("noisy"), gate.enter("noisy")]
    with pytest.raises(Overloaded, match=r"noisy.*2 calls in flight") as refused:
        gate.enter("noisy")
    assert refused.value.code.name == "RESOURCE_EXHAUSTED"
    assert refused.value.trailers[0][0] == PUSHBACK_TRAILER and int(refused.value.trailers[0][1]) >= 1
    assert gate.enter("quiet") is None  # another tenant is not limited
    gate.leave(tickets[0])  # type: ignore[arg-type]
    assert gate.enter("noisy") is not None
    assert gate.refused == {("noisy", "inflight"): 1}


def test_rate_limit_refuses_after_the_burst_with_the_time_to_the_next_token() -> None:
    gate = admission({"noisy": TenantLimits(rps=2, burst=3)})
    for _ in range(3):
        ticket = gate.enter("noisy")
        assert ticket is not None
        gate.leave(ticket)
    with pytest.raises(Overloaded, match="rate limit of 2 calls/s") as refused:
        gate.enter("noisy")
    assert 1 <= int(refused.value.trailers[0][1]) <= 500


def test_callers_waiting_for_in_flight_slots_are_told_to_wait_for_the_slots_ahead_of_them() -> None:
    # 14 callers over a limit of 2 calls of 10 ms: slots free at 200/s, so each caller, refused and told
    # to come back, should wait about the time 14 callers take to pass 2 slots (~70 ms), not one call's
    # time (they would come back 7 times too often, each time refused again: refusals cost the router a
    # call's work each).
    limits = TenantLimits(max_inflight=2)
    state = TenantState("noisy", limits, call_s=0.010)
    now, pushbacks = 0.0, []
    for _ in range(40):  # steady state: the 14 callers refused in turn, each back after its push-back
        for _ in range(14):
            pushbacks.append(inflight_pushback_s(state, now))
            now += pushbacks[-1] / 14
    settled = pushbacks[-14:]
    assert all(0.05 <= p <= 0.12 for p in settled), settled


def test_callers_refused_for_the_rate_are_spread_over_the_tokens_to_come() -> None:
    # 10 callers refused at once for a rate of 100/s: each is told to come back one token later than the
    # one before, so they return about one per token instead of all ten for the next one.
    gate = admission({"noisy": TenantLimits(rps=100, burst=1)})
    ticket = gate.enter("noisy")
    assert ticket is not None
    pushbacks = []
    for _ in range(10):
        with pytest.raises(Overloaded) as refused:
            gate.enter("noisy")
        pushbacks.append(int(refused.value.trailers[0][1]))
    assert pushbacks[0] <= 11  # the next token: 10 ms
    assert all(later > earlier for earlier, later in itertools.pairwise(pushbacks))
    assert 90 <= pushbacks[-1] <= 111  # nine callers ahead of it: about nine tokens more


def test_the_default_applies_to_tenants_without_an_entry_and_callers_without_a_tenant() -> None:
    gate = admission({"vip": TenantLimits(priority="high")}, default=TenantLimits(max_inflight=1))
    assert gate.enter("vip") is None
    assert gate.enter("someone") is not None
    with pytest.raises(Overloaded):
        gate.enter("someone")
    assert gate.enter(None) is not None
    assert gate.refused == {("other", "inflight"): 1}  # a tenant without an entry is not a label


def test_each_router_enforces_its_share_of_a_fleet_wide_limit() -> None:
    gate = admission({"noisy": TenantLimits(max_inflight=10, rps=90, burst=30)}, routers=3)
    limits = gate.limits_of("noisy")
    assert (limits.max_inflight, limits.rps, limits.burst) == (4, 30.0, 10)  # in flight rounds up
    for _ in range(4):
        gate.enter("noisy")
    with pytest.raises(Overloaded, match=r"4 calls in flight at this router .*10 across 3 routers"):
        gate.enter("noisy")


def test_limits_follow_store_events_and_a_cleared_limit_admits_again() -> None:
    gate, fleet = Admission(), Fleet()

    def apply(kind: str, key: str, value: bytes = b"") -> None:
        gate.on_change(fleet, fleet.apply(Event(kind, key, value, fleet.revision + 1)))

    apply("put", registry.TENANTS + "noisy", TenantLimits(max_inflight=1).to_json())
    apply("put", registry.ROUTERS + "r1", b"1")
    assert gate.active and gate.enter("noisy") is not None
    with pytest.raises(Overloaded):
        gate.enter("noisy")
    apply("put", registry.ROUTERS + "r2", b"1")  # two routers: a limit of 1 still admits 1 here
    assert gate.routers == 2 and gate.limits_of("noisy").max_inflight == 1
    apply("delete", registry.TENANTS + "noisy")
    assert not gate.active and gate.enter("noisy") is None
    apply("put", registry.TENANTS + "bad", b'{"max_inflight": -1}')  # skipped with a log line
    assert "bad" not in fleet.tenants and fleet.skipped == 1


def test_a_streams_admission_is_held_for_its_whole_block() -> None:
    gate = admission({"t": TenantLimits(max_inflight=1)})
    with gate.admitted("t"):
        assert gate.inflight("t") == 1
        with pytest.raises(Overloaded):
            gate.enter("t")
    assert gate.inflight("t") == 0


def test_in_flight_pushback_grows_with_the_callers_refused_meanwhile() -> None:
    gate = admission({"noisy": TenantLimits(max_inflight=2)})
    gate.enter("noisy"), gate.enter("noisy")
    pushbacks = []
    for _ in range(8):
        with pytest.raises(Overloaded) as refused:
            gate.enter("noisy")
        pushbacks.append(refused.value.pushback_ms)
    assert pushbacks == sorted(pushbacks) and pushbacks[-1] >= 3 * pushbacks[0]  # type: ignore[operator]
