"""The router's gauges and counters read when /metrics is scraped: the store it follows, and how many calls
found a ready copy (cache hits) or had to wait for one (misses). Fleet-wide gauges (copies, memory) come
from the leading placement controller (placement/metrics.py), not from every router."""

from __future__ import annotations

import time
from collections.abc import Iterable

from modelyard import metric_names as names
from modelyard.router.routing import Router
from modelyard.telemetry import Telemetry


def register_fleet_gauges(telemetry: Telemetry, router: Router) -> None:
    table = router.table
    follower = router.follower

    def generation() -> Iterable[tuple[float, dict[str, str]]]:
        yield float(table.fleet.generation), {}

    def reachable() -> Iterable[tuple[float, dict[str, str]]]:
        yield (0.0 if follower.degraded or not table.loaded else 1.0), {}

    def lag() -> Iterable[tuple[float, dict[str, str]]]:
        since = follower.degraded_since
        yield (time.monotonic() - since if since is not None else 0.0), {}

    telemetry.gauge(names.SHARD_MAP_GENERATION, generation, "Shard map generation the router follows")
    telemetry.gauge(names.STORE_REACHABLE, reachable, "1 while the router's store watch is healthy")
    telemetry.gauge(
        names.WATCH_LAG, lag, "Seconds the routing table has gone without store updates (0: live)"
    )
    telemetry.counter(
        names.CACHE_HITS, lambda: [(float(router.cache_hits), {})], "Calls that found a ready copy"
    )
    telemetry.counter(
        names.CACHE_MISSES, lambda: [(float(router.lazy.misses), {})], "Calls that waited for a copy (cold)"
    )
