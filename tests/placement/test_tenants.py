"""Tenant limits as values: parsing the CLI's text, reading untrusted JSON, shares among routers."""

from __future__ import annotations

import pytest

from modelyard.placement.tenants import NO_LIMITS, TenantLimits, parse_limits, share


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        ({"max_inflight": "0"}, "bad --max-inflight '0': expected a positive integer"),
        ({"max_inflight": "-3"}, "bad --max-inflight '-3'"),
        ({"max_inflight": "two"}, "bad --max-inflight 'two'"),
        ({"rps": "0"}, "bad --rps '0'"),
        ({"rps": "nan"}, "bad --rps 'nan'"),
        ({"rps": "inf"}, "bad --rps 'inf'"),
        ({"burst": "1.5"}, "bad --burst '1.5'"),
        ({"priority": "urgent"}, "bad --priority 'urgent': expected one of high, normal, low"),
        ({}, "nothing to set"),
    ],
)
def test_bad_values_are_refused_naming_the_flag(flags: dict[str, str], message: str) -> None:
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        parse_limits(NO_LIMITS, **flags)


def test_given_values_replace_the_entrys_and_the_others_stay() -> None:
    base = TenantLimits(max_inflight=4, rps=10.0, priority="low")
    assert parse_limits(base, rps="2.5", priority="high") == TenantLimits(4, 2.5, 0, "high")


def test_stored_json_is_type_checked() -> None:
    limits = TenantLimits(3, 1.5, 2, "high")
    assert TenantLimits.from_json(limits.to_json()) == limits
    assert TenantLimits.from_json(b'{"rps": 5, "future": 1}') == TenantLimits(rps=5.0)
    for bad in (b'{"max_inflight": "3"}', b'{"rps": -1}', b'{"priority": "max"}', b"[]", b'{"burst": true}'):
        with pytest.raises(ValueError):
            TenantLimits.from_json(bad)


def test_a_share_rounds_counts_up_and_divides_rates() -> None:
    limits = TenantLimits(max_inflight=2, rps=10.0, priority="high")
    assert share(limits, 1) is limits
    assert share(limits, 4) == TenantLimits(1, 2.5, 3, "high")  # burst: 10 (1 s of rps) / 4, rounded up
    assert share(NO_LIMITS, 3) == NO_LIMITS
