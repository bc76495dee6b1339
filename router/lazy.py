"""Lazy load: a call for a registered model with no ready copy places and loads it, then proceeds.

Like SageMaker multi-model endpoints, the first call pays for the load. Concurrent calls for the same cold
model share one load (one placement, one agent load), each bounded by its own deadline. When the model
has no copy on a live container, the router adds one to the shard map itself — the planner's sticky plan
keeps every other assignment as it is — under the map's generation compare-and-swap.
"""

from __future__ import annotations

import asyncio
import logging
import time

from modelyard.telemetry import Telemetry
from placement import registry
from placement.model import Container, ModelVersion
from placement.rebalance import budget_bytes, plan_fleet
from placement.registry import ConcurrentPlanError
from placement.store import Store, StoreError
from router.errors import DeadlineExceeded, NoReadyCopy
from router.table import RoutingTable

log = logging.getLogger(__name__)

DEFAULT_WAIT_S = 30.0  # for calls without a deadline
LOAD_WAIT_S = 300.0  # how long one shared load is followed, whoever still waits for it
_POLL_S = 0.01


class LazyLoader:
    def __init__(self, store: Store, table: RoutingTable, telemetry: Telemetry | None = None) -> None:
        self.store = store
        self.telemetry = telemetry
        self.table = table
        self.placements = 0  # shard map writes made for cold models
        self._loads: dict[str, asyncio.Task[None]] = {}
        self._waiting: dict[str, int] = {}  # callers waiting per model

    async def ready_copies(self, model: ModelVersion, wait_s: float | None) -> tuple[Container, ...]:
        deadline = time.monotonic() + (wait_s if wait_s is not None else DEFAULT_WAIT_S)
        task = self._loads.get(model.key)
        if task is None or task.done():
            # The shared wait is bounded by LOAD_WAIT_S, not by this caller's deadline: a caller that gives
            # up early must not end the wait of those who came later.
            task = asyncio.create_task(self._place_and_wait(model, time.monotonic() + LOAD_WAIT_S))
            self._loads[model.key] = task
            task.add_done_callback(lambda done: self._forget(model.key, done))
        started = time.monotonic()
        self._waiting[model.key] = self._waiting.get(model.key, 0) + 1
        try:
            # shield: one caller giving up (deadline, cancel) must not cancel the load the others wait on
            await asyncio.wait_for(asyncio.shield(task), timeout=max(0.0, deadline - time.monotonic()))
        except TimeoutError:
            pass
        finally:
            self._waiting[model.key] -= 1
            if not self._waiting[model.key]:
                del self._waiting[model.key]
        copies = self.table.ready_copies(model.key)
        if self.telemetry is not None and self.telemetry.metrics:
            outcome = "ready" if copies else ("failed" if self._all_failed(model.key) else "timeout")
            self.telemetry.lazy_loads.add(1, {"model": model.name, "outcome": outcome})
            self.telemetry.lazy_load_duration.record(time.monotonic() - started, {"model": model.name})
        if not copies:
            if wait_s is not None and time.monotonic() >= deadline and not self._all_failed(model.key):
                raise DeadlineExceeded(
                    f"model '{model.name}' version '{model.version}' was not ready within the call's "
                    "deadline (its load goes on)"
                )
            raise NoReadyCopy(self._why_not_ready(model))
        return copies

    def _forget(self, key: str, task: asyncio.Task[None]) -> None:
        if self._loads.get(key) is task:
            del self._loads[key]

    def _why_not_ready(self, model: ModelVersion) -> str:
        fleet = self.table.fleet
        failures = [
            f"{cid}: {state.message}"
            for cid in fleet.assignments.get(model.key, ())
            if (state := fleet.states.get((cid, model.key))) is not None and state.phase == "failed"
        ]
        if failures:
            return f"model '{model.name}' version '{model.version}' failed to load ({'; '.join(failures)})"
        return f"model '{model.name}' version '{model.version}' has no ready copy"

    def _live_assignment(self, key: str) -> bool:
        fleet = self.table.fleet
        return any(cid in fleet.containers for cid in fleet.assignments.get(key, ()))

    def _all_failed(self, key: str) -> bool:
        fleet = self.table.fleet
        ids = [cid for cid in fleet.assignments.get(key, ()) if cid in fleet.containers]
        states = [fleet.states.get((cid, key)) for cid in ids]
        return bool(ids) and all(s is not None and s.phase == "failed" for s in states)

    async def _place_and_wait(self, model: ModelVersion, deadline: float) -> None:
        if not self._live_assignment(model.key):
            try:
                await self._place(model)
            except StoreError as exc:
                log.warning("lazy load of %s: cannot place it: %s", model.key, exc)
                return
        while time.monotonic() < deadline:
            if self.table.ready_copies(model.key) or self._all_failed(model.key):
                return
            await asyncio.sleep(_POLL_S)
            if not self._waiting.get(model.key):
                return  # every caller gave up; the agent goes on loading, the next call waits again

    async def _place(self, model: ModelVersion) -> None:
        for _ in range(5):
            fleet = await registry.load_fleet(self.store)
            if any(cid in fleet.containers for cid in fleet.assignments.get(model.key, ())):
                return  # someone placed it meanwhile
            registered = list(fleet.models.values())
            result = plan_fleet(
                registered,
                list(fleet.containers.values()),
                fleet.assignments,
                budgets={m.key: budget_bytes(fleet, m) for m in registered},
            )
            placed = result.assignments.get(model.key)
            if not placed:
                raise StoreError(result.unplaced.get(model.key, "no container has room"))
            assignments = dict(fleet.assignments)
            assignments[model.key] = placed
            try:
                await registry.write_shard_map(self.store, assignments, expected_generation=fleet.generation)
            except ConcurrentPlanError:
                continue
            self.placements += 1
            return
        raise StoreError("the shard map kept changing; gave up placing")
