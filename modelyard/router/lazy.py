"""Lazy load: a call for a registered model with no ready copy waits for one to be loaded, then proceeds.

Like SageMaker multi-model endpoints, the first call pays for the load. The router neither plans nor
writes the shard map: when the model has no copy on a live container it records that the model is wanted
(one small key; concurrent callers share one) and the placement controller places it. Every wait is on
routing-table events, bounded by the caller's deadline. With no controller running, or when the controller
says the model cannot be placed, the call fails at once with the reason.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

from modelyard.placement import registry
from modelyard.placement.model import Container, ModelVersion
from modelyard.placement.store import Store, StoreError
from modelyard.router.errors import DeadlineExceeded, NoController, NoReadyCopy
from modelyard.router.table import RoutingTable
from modelyard.telemetry import Telemetry

log = logging.getLogger(__name__)

DEFAULT_WAIT_S = 30.0  # for calls without a deadline


class LazyLoader:
    def __init__(
        self,
        store: Store,
        table: RoutingTable,
        telemetry: Telemetry | None = None,
        store_down: Callable[[], bool] = lambda: False,
    ) -> None:
        """`store_down()`: whether the router's store follower knows the store does not answer now."""
        self.store = store
        self.store_down = store_down
        self.telemetry = telemetry
        self.table = table
        self.placements = 0  # wanted-keys written (requests to the controller), for tests and metrics
        self.misses = 0  # calls that found no ready copy and waited here (cache misses, on /metrics)
        self._asking: dict[str, asyncio.Task[int]] = {}

    async def ready_copies(self, model: ModelVersion, wait_s: float | None) -> tuple[Container, ...]:
        started = time.monotonic()
        self.misses += 1
        deadline = started + (wait_s if wait_s is not None else DEFAULT_WAIT_S)
        outcome = "timeout"
        try:
            copies = await self._wait(model, deadline, wait_s is not None)
            outcome = "ready"
            return copies
        except (NoReadyCopy, NoController):
            outcome = "failed"
            raise
        finally:
            if self.telemetry is not None and self.telemetry.metrics:
                self.telemetry.lazy_loads.add(1, {"model": model.name, "outcome": outcome})
                waited_s = time.monotonic() - started
                self.telemetry.lazy_load_duration.record(waited_s, {"model": model.name})
                self.telemetry.cold_call_wait.record(waited_s)

    async def _wait(self, model: ModelVersion, deadline: float, has_deadline: bool) -> tuple[Container, ...]:
        key = model.key
        asked_at = 0  # store revision of the request this call relies on; 0: none yet
        while True:
            copies = self.table.ready_copies(key)
            if copies:
                return copies
            fleet = self.table.fleet
            live = [cid for cid in fleet.assignments.get(key, ()) if cid in fleet.containers]
            if live:
                states = [fleet.states.get((cid, key)) for cid in live]
                if all(s is not None and s.phase == "failed" for s in states):
                    raise NoReadyCopy(self._failures(model, live))
            elif not fleet.leader and not fleet.assignments.get(key):
                # A copy on a container that is down may come back without a controller (its agent
                # reloads it); with none assigned, nothing would ever place the model.
                raise NoController(
                    f"model '{model.name}' version '{model.version}' has no copy, and no placement "
                    "controller is running to place it (start one: `modelyard controller`)"
                )
            reason = fleet.wanted.get(key)
            # A copy on a container that is down (restarting, or its lease lapsed) may come back: wait for
            # it or for its replacement within the deadline. With none, the controller's reason is final.
            lost = bool(fleet.assignments.get(key))
            if not live and not lost and reason and asked_at and fleet.revision >= asked_at:
                raise NoReadyCopy(
                    f"model '{model.name}' version '{model.version}' cannot be placed: {reason}"
                )
            if not asked_at and self.store_down():
                # Cut off from the store, the router cannot ask for a load: say so now, not at the deadline.
                raise NoReadyCopy(
                    f"model '{model.name}' version '{model.version}' has no ready copy, and the store that "
                    "would place one does not answer this router now"
                )
            if not asked_at:
                # Wanted: the controller places it if it has no copy, and its agent loads it before the
                # rest of a backlog. Pending ("") means another call asked already; a reason is an earlier
                # answer that may no longer hold (memory was freed since): ask again.
                asked_at = fleet.revision if reason == "" else await self._ask(key)
            left = deadline - time.monotonic()
            if left <= 0:
                if has_deadline:
                    raise DeadlineExceeded(
                        f"model '{model.name}' version '{model.version}' was not ready within the call's "
                        "deadline (its load goes on)"
                    )
                raise NoReadyCopy(f"model '{model.name}' version '{model.version}' has no ready copy")
            await self.table.wait_changed(key, left)

    async def _ask(self, key: str) -> int:
        """Writes the wanted key, once for all callers until the table shows it; returns its revision."""
        task = self._asking.get(key)
        if task is None or (
            task.done() and (task.exception() is not None or task.result() <= self.table.fleet.revision)
        ):
            task = asyncio.create_task(registry.want_model(self.store, key))
            self._asking[key] = task
            self.placements += 1
        try:
            return await asyncio.shield(task)
        except StoreError as exc:
            raise NoReadyCopy(
                f"model {key} has no copy and the store cannot be reached to ask for one: {exc}"
            ) from exc

    def _failures(self, model: ModelVersion, live: list[str]) -> str:
        fleet = self.table.fleet
        reasons = "; ".join(
            f"{cid}: {state.message or 'load failed'}"
            for cid in live
            if (state := fleet.states.get((cid, model.key))) is not None
        )
        return f"model '{model.name}' version '{model.version}' failed to load ({reasons})"
