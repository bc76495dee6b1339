"""20,000 models imported into a live `modelyard up` (10 of our containers) by one `modelyard models import`,
while a warm model keeps answering through the router (issue 30; benchmarks/test_live_import.py measures 100k
and judges the issue's bound). Everything runs as users run it: `up`, the import, the callers and the
readiness reads (`modelyard models list`) are processes of their own."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.live_import import Imported, UpProcess, call_sample, import_while_warm, live_fleet, window

COUNT = 20_000
CONTAINERS = 10
# What this test asserts of a warm caller while the import runs: no stall (every call answered, none wrong,
# p99 under 1 s, none over 3 s). Issue 30's bound, p99 <= 50 ms and max <= 250 ms, is judged by
# benchmarks/test_live_import.py and falls short on 2 shared cores: measured here on a quiet machine, p99
# 130 and 406 ms (max 220 and 507 ms) through the router in two runs, 27 and 79 ms on the container directly
# (the anchor: the import, the controller's placements and the loads take the machine's CPU).
WARM_P99_MS = 1000.0
WARM_MAX_MS = 3000.0
READY_CEILING_S = 300.0
pytestmark = pytest.mark.timeout(900)  # the fleet's start, the import, every load: 2 min on a quiet machine


@pytest.fixture(scope="module")
def imported(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[UpProcess, Imported]]:
    folder = tmp_path_factory.mktemp("twenty-thousand")
    with live_fleet(folder, CONTAINERS) as up:
        yield up, import_while_warm(up, folder, COUNT, READY_CEILING_S)


def test_a_warm_model_never_stalls_while_20000_models_are_imported(
    imported: tuple[UpProcess, Imported],
) -> None:
    _, result = imported
    during = window(result.warm, result.started_at, result.ended_at)
    anchor = window(result.direct, result.started_at, result.ended_at)
    loading = window(result.warm, result.ended_at, result.ended_at + result.ready_s)
    print(
        f"\n{COUNT} models into {CONTAINERS} containers: import {result.import_s:.1f} s, every copy ready "
        f"{result.ready_s:.0f} s later; during the import, the warm model through the router: "
        f"{during.line()}; "
        f"on its container directly: {anchor.line()}; through the router while the copies loaded: "
        f"{loading.line()}"
    )
    assert during.calls > 100, "the warm caller barely called during the import"
    assert during.errors == [] and loading.errors == [] and anchor.errors == []
    assert during.p99_ms <= WARM_P99_MS, f"warm p99 {during.p99_ms:.0f} ms during the import"
    assert during.max_ms <= WARM_MAX_MS, f"slowest warm call {during.max_ms:.0f} ms during the import"


def test_random_models_of_20000_answer_through_the_router(imported: tuple[UpProcess, Imported]) -> None:
    up, _ = imported
    assert call_sample(up.address, COUNT, 400) == []
