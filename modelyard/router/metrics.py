"""The router's gauges: what it sees of the fleet in the store, read when /metrics is scraped."""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Iterable

from modelyard import metric_names as names
from modelyard.placement.usage import ContainerUsage, lost_copies, under_replicated, usage
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

    def copies() -> Iterable[tuple[float, dict[str, str]]]:
        fleet = table.fleet
        states = Counter(s.phase for (cid, _), s in fleet.states.items() if cid in fleet.containers)
        states["lost"] = len(lost_copies(fleet))
        for state in ("loading", "ready", "failed", "unloading", "lost"):
            yield float(states.get(state, 0)), {"state": state}

    def unplaced() -> Iterable[tuple[float, dict[str, str]]]:
        yield float(len(under_replicated(table.fleet))), {}

    def rows() -> list[ContainerUsage]:
        return usage(table.fleet, table.fleet.assignments)

    def used() -> Iterable[tuple[float, dict[str, str]]]:
        for row in rows():
            if row.live:
                yield float(row.used_bytes), {"container": row.id}

    def capacity() -> Iterable[tuple[float, dict[str, str]]]:
        for row in rows():
            if row.live:
                yield float(row.capacity_bytes), {"container": row.id}

    telemetry.gauge(names.SHARD_MAP_GENERATION, generation, "Shard map generation the router follows")
    telemetry.gauge(names.STORE_REACHABLE, reachable, "1 while the router's store watch is healthy")
    telemetry.gauge(
        names.WATCH_LAG, lag, "Seconds the routing table has gone without store updates (0: live)"
    )
    telemetry.gauge(names.COPIES, copies, "Model copies by state")
    telemetry.gauge(names.UNPLACED_MODELS, unplaced, "Models with fewer live copies than replicas")
    telemetry.gauge(names.CONTAINER_MEMORY_USED, used, "Bytes the shard map places on each container")
    telemetry.gauge(names.CONTAINER_MEMORY_CAPACITY, capacity, "Each container's memory budget")
