"""Issue 30: `modelyard models import` of 100,000 lines into a running `modelyard up --custom-containers 20`
(the embedded store, our containers, tiny models), a warm caller answering through the router meanwhile.

Judged: the import (a whole process) <= 15 s; every copy ready <= 3 min after it; the warm caller during the
import p99 <= 50 ms, max <= 250 ms and 0 failed or wrong calls; a sample of imported models answering
afterwards. Also shown (not judged): the warm caller while the copies load, after the import, and the anchor:
the same model called on its container directly (with the fleet secret, as the router calls it) during the
import, which says what the machine itself gave any caller then.
Quick mode (CI): 2,000 models into 4 containers, nothing judged. Everything is a process of its own
(tests/live_import.py): `up`, the import, the warm caller and the readiness reads.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.live_import import call_sample, import_while_warm, live_fleet, window

IMPORT_TARGET_S = 15.0
READY_TARGET_S = 180.0
WARM_P99_TARGET_MS = 50.0
WARM_MAX_TARGET_MS = 250.0


@pytest.mark.timeout(1800)  # 100k: the fleet's start, the import and every load (minutes)
def test_import_into_a_live_fleet(benchmark, record, verdict, quick: bool, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    count, containers = (2_000, 4) if quick else (100_000, 20)
    with live_fleet(tmp_path, containers) as up:
        result = import_while_warm(up, tmp_path, count, ready_ceiling_s=900)
        failures = call_sample(up.address, count, 500)
    during = window(result.warm, result.started_at, result.ended_at)
    anchor = window(result.direct, result.started_at, result.ended_at)
    loading = window(result.warm, result.ended_at, result.ended_at + result.ready_s)
    size = f"{count // 1000}k into {containers} containers"
    record(f"{size}: warm caller while the copies loaded (after the import): {loading.line()}")
    record(f"{size}: the anchor, the warm model on its container directly during the import: {anchor.line()}")
    verdict(
        f"{size}: import (whole process)",
        f"{result.import_s:.1f} s",
        f"<= {IMPORT_TARGET_S:.0f} s",
        result.import_s <= IMPORT_TARGET_S,
    )
    verdict(
        f"{size}: every copy ready after the import",
        f"{result.ready_s:.0f} s",
        f"<= {READY_TARGET_S:.0f} s",
        result.ready_s <= READY_TARGET_S,
    )
    verdict(
        f"{size}: warm caller during the import",
        f"p99 {during.p99_ms:.1f} ms, max {during.max_ms:.0f} ms ({during.calls} calls)",
        f"p99 <= {WARM_P99_TARGET_MS:.0f} ms, max <= {WARM_MAX_TARGET_MS:.0f} ms",
        during.p99_ms <= WARM_P99_TARGET_MS and during.max_ms <= WARM_MAX_TARGET_MS,
    )
    verdict(
        f"{size}: failed or wrong calls (warm during import and loading; 500 imported models after)",
        str(len(during.errors) + len(loading.errors) + len(failures)),
        "0",
        not (during.errors or loading.errors or failures),
    )
    benchmark.pedantic(lambda: None, rounds=1, iterations=1)
    benchmark.extra_info.update(
        import_s=round(result.import_s, 2),
        ready_s=round(result.ready_s, 1),
        warm_p99_ms=round(during.p99_ms, 1),
        warm_max_ms=round(during.max_ms, 1),
    )
    assert during.calls > 0
