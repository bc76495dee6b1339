"""Version choice: explicit version, tenant pin, weighted split, default, highest — in that order."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from modelyard.placement.model import RouteRule
from modelyard.router.versions import choose_version

RULE = RouteRule("m", default_version="2", tenant_versions=(("acme", "1"),), weights=())


def test_highest_numeric_version_without_a_rule() -> None:
    assert choose_version("m", {"2", "10", "9"}) == "10"


def test_explicit_version_wins_over_pins_and_defaults() -> None:
    assert choose_version("m", {"1", "2", "3"}, requested="3", tenant="acme", rule=RULE) == "3"
    assert choose_version("m", {"1", "2"}, requested="7", rule=RULE) is None


def test_tenant_pin_then_default_then_highest() -> None:
    assert choose_version("m", {"1", "2", "3"}, tenant="acme", rule=RULE) == "1"
    assert choose_version("m", {"1", "2", "3"}, tenant="other", rule=RULE) == "2"
    assert choose_version("m", {"1", "3"}, tenant="other", rule=RULE) == "3"  # default not visible: skipped
    assert choose_version("m", {"2", "3"}, tenant="acme", rule=RULE) == "2"  # pin not visible: skipped


@given(st.text(min_size=1, max_size=20))
def test_a_split_is_deterministic_per_request_id(request_id: str) -> None:
    rule = RouteRule("m", weights=(("1", 90), ("2", 10)))
    first = choose_version("m", {"1", "2"}, request_id=request_id, rule=rule)
    assert first in {"1", "2"}
    assert all(choose_version("m", {"1", "2"}, request_id=request_id, rule=rule) == first for _ in range(3))


def test_a_split_follows_its_weights_over_many_requests() -> None:
    rule = RouteRule("m", weights=(("1", 80), ("2", 20)))
    chosen = [choose_version("m", {"1", "2"}, request_id=f"req-{i}", rule=rule) for i in range(10_000)]
    share = chosen.count("2") / len(chosen)
    assert 0.18 < share < 0.22


def test_a_tenant_pin_beats_the_split_and_the_split_beats_the_default() -> None:
    rule = RouteRule("m", default_version="3", tenant_versions=(("acme", "1"),), weights=(("2", 1),))
    assert choose_version("m", {"1", "2", "3"}, tenant="acme", request_id="x", rule=rule) == "1"
    assert choose_version("m", {"1", "2", "3"}, tenant="zeta", request_id="x", rule=rule) == "2"


def test_nothing_visible_gives_none() -> None:
    assert choose_version("m", set(), rule=RULE) is None
