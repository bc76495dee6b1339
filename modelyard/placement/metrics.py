"""The placement controller's gauges, read when /metrics is scraped: whether it leads, and the fleet as the
store describes it (copies by state, unplaced models, memory per container).

Only the leading controller exports the fleet gauges: every controller and router sees the same store, and
one source keeps the series single (a standby reports `modelyard_controller_leader 0` and nothing else).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable

from modelyard import metric_names as names
from modelyard.placement.controller import PlacementController
from modelyard.placement.usage import lost_copies, under_replicated, usage
from modelyard.telemetry import Telemetry

Samples = Iterable[tuple[float, dict[str, str]]]
COPY_STATES = ("loading", "ready", "failed", "unloading", "lost")


def register_controller_gauges(telemetry: Telemetry, controller: PlacementController) -> None:
    follower = controller.follower

    def leading() -> bool:
        return controller.leading.is_set()

    def leader() -> Samples:
        yield (1.0 if leading() else 0.0), {}

    def copies() -> Samples:
        if not leading():
            return
        fleet = follower.fleet
        states: Counter[str] = Counter(
            s.phase for (cid, _), s in fleet.states.items() if cid in fleet.containers
        )
        states["lost"] = len(lost_copies(fleet))
        for state in COPY_STATES:
            yield float(states.get(state, 0)), {"state": state}

    def unplaced() -> Samples:
        if leading():
            yield float(len(under_replicated(follower.fleet))), {}

    def memory() -> Samples:
        if not leading():
            return
        for row in usage(follower.fleet, follower.fleet.assignments):
            if row.live:
                yield float(row.used_bytes), {"container": row.id, "kind": "used"}
                yield float(row.capacity_bytes), {"container": row.id, "kind": "capacity"}

    # The store's size from every controller: a full store lets none of them lead (campaigning is a write).
    def store_db() -> Samples:
        if controller.space is not None:
            yield float(controller.space.db_bytes), {}

    def store_quota() -> Samples:
        if controller.space is not None and controller.store_quota_bytes:
            yield float(controller.store_quota_bytes), {}

    def store_full() -> Samples:
        if controller.space is not None:
            yield (1.0 if controller.space.full else 0.0), {}

    telemetry.gauge(names.CONTROLLER_LEADER, leader, "1 on the leading placement controller")
    telemetry.gauge(names.STORE_DB_BYTES, store_db, "etcd's database size (every controller)")
    telemetry.gauge(
        names.STORE_QUOTA_BYTES, store_quota, "etcd's space quota, as configured (every controller)"
    )
    telemetry.gauge(
        names.STORE_FULL,
        store_full,
        "1 while etcd refuses writes for lack of space (every controller)",
    )
    telemetry.gauge(names.COPIES, copies, "Model copies by state (leading controller only)")
    telemetry.gauge(
        names.UNPLACED_MODELS,
        unplaced,
        "Models with fewer live copies than replicas (leading controller only)",
    )
    telemetry.gauge(
        names.CONTAINER_MEMORY,
        memory,
        "Bytes the shard map places on each container (used) and its budget (capacity); leading "
        "controller only",
    )
