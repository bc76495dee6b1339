"""Per-model call rates as routers report them, and their sum across routers. Pure but for `read_rates`.

Each router writes one key under its own lease, `/modelyard/rates/{router id}`, every few seconds:

    {"t": UNIX TIME, "period_s": P, "rates": {"name@version": calls/s, ...},
     "idle_s": {"name@version": seconds since its last call, ...}}

`rates` and `idle_s` hold only the models called during that period, so a fleet of 100k models with a few
hundred hot ones costs a few kB per router. The controller sums the rates of every router, and remembers
each model's most recent call by any router as its last use (placement/autoscaler.py).
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Iterable
from dataclasses import dataclass

from modelyard.placement.registry import ROOT
from modelyard.placement.store import KeyValue, Store

log = logging.getLogger(__name__)

RATES = ROOT + "rates/"


@dataclass(frozen=True)
class RateReport:
    """One router's last report."""

    router: str
    t: float  # when it was made (UNIX time)
    period_s: float
    rates: dict[str, float]  # model key -> calls/s over the period
    idle_s: dict[str, float]  # model key -> seconds between its last call and `t`

    def to_json(self) -> bytes:
        return json.dumps(
            {"t": self.t, "period_s": self.period_s, "rates": self.rates, "idle_s": self.idle_s},
            separators=(",", ":"),
        ).encode()

    @classmethod
    def from_json(cls, router: str, raw: bytes) -> RateReport:
        data = json.loads(raw.decode())
        if data.__class__ is not dict:
            raise ValueError("expected a JSON object")
        t, period_s = data.get("t"), data.get("period_s")
        for name, value in (("t", t), ("period_s", period_s)):
            if value.__class__ not in (int, float) or not math.isfinite(value) or value < 0:
                raise ValueError(f"{name}: expected a non-negative number, got {value!r}")
        return cls(router, float(t), float(period_s), _numbers(data, "rates"), _numbers(data, "idle_s"))  # type: ignore[arg-type]


def _numbers(data: dict[str, object], name: str) -> dict[str, float]:
    value = data.get(name, {})
    if value.__class__ is not dict:
        raise ValueError(f"{name}: expected an object of numbers")
    out: dict[str, float] = {}
    for key, number in value.items():
        if number.__class__ not in (int, float) or not math.isfinite(number) or number < 0:
            raise ValueError(f"{name}: {key}: expected a non-negative number, got {number!r}")
        out[key] = float(number)
    return out


@dataclass(frozen=True)
class ModelRate:
    """A model's calls/s summed over routers, and the seconds since any router last sent it a call."""

    rate: float
    idle_s: float


def sum_reports(reports: Iterable[RateReport], now: float) -> dict[str, ModelRate]:
    """Rates summed across routers. A report lives under its router's lease, so a router that stops takes
    its report with it; one that is late (a busy router, a slow store) still counts for ten of its periods
    (at least 30 s) rather than reading as no calls, and after that only its last-call times count."""
    rates: dict[str, float] = {}
    idle: dict[str, float] = {}
    for report in reports:
        age = max(0.0, now - report.t)
        if age <= max(10 * report.period_s, 30.0):
            for key, rate in report.rates.items():
                rates[key] = rates.get(key, 0.0) + rate
        for key, seconds in report.idle_s.items():
            since = age + seconds
            if since < idle.get(key, math.inf):
                idle[key] = since
    return {
        key: ModelRate(rates.get(key, 0.0), idle.get(key, math.inf)) for key in rates.keys() | idle.keys()
    }


def parse_reports(items: Iterable[KeyValue]) -> list[RateReport]:
    """Reports from store items; one that does not parse is skipped with one log line."""
    reports = []
    for item in items:
        try:
            reports.append(RateReport.from_json(item.key[len(RATES) :], item.value))
        except (ValueError, TypeError, UnicodeDecodeError, AttributeError) as exc:
            log.warning("store key %s: skipped, its value does not parse (%s)", item.key, exc)
    return reports


async def read_rates(store: Store, now: float) -> dict[str, ModelRate]:
    items, _ = await store.get_prefix(RATES)
    return sum_reports(parse_reports(items), now)
