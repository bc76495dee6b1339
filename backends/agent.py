"""The agent: one per container. Converges the container's loaded models to the shard map and reports.

It keeps the container registered under a lease (its liveness), follows the store's watch, loads what the
map assigns and unloads what it no longer does, and writes each copy's state (loading / ready / failed)
so routers send traffic to ready copies only. A failed load is retried with exponential backoff.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass
from typing import Protocol

from backends.triton import LoadError
from modelyard.telemetry import Telemetry
from placement import registry
from placement.model import Container, CopyState, ModelVersion
from placement.registry import Fleet
from placement.store import CompactedError, Lease, Store, StoreError

log = logging.getLogger(__name__)

# Events under these prefixes can change what this container should hold.
_RELEVANT = (registry.ASSIGN, registry.MODELS)


class ContainerAdapter(Protocol):
    """What the agent needs of a container: TritonAdapter (triton.py) or CustomAdapter (custom.py)."""

    async def live(self) -> bool: ...
    async def load(self, model: ModelVersion) -> None: ...
    async def unload(self, model: ModelVersion) -> None: ...
    async def footprint(self, model: ModelVersion) -> int: ...
    async def close(self) -> None: ...


@dataclass
class _Backoff:
    attempts: int = 0
    next_try: float = 0.0


class Agent:
    def __init__(
        self,
        store: Store,
        container: Container,
        adapter: ContainerAdapter,
        *,
        lease_ttl_s: float = 10.0,
        max_parallel_loads: int = 4,
        retry_base_s: float = 1.0,
        retry_max_s: float = 60.0,
        drain_s: float = 1.0,
        telemetry: Telemetry | None = None,
    ) -> None:
        self.store = store
        self.container = container
        self.adapter = adapter
        self.lease_ttl_s = lease_ttl_s
        self.retry_base_s = retry_base_s
        self.retry_max_s = retry_max_s
        self.drain_s = drain_s
        self.telemetry = telemetry
        self.loaded: dict[str, ModelVersion] = {}
        self.load_calls = 0  # loads sent to the container, for tests and metrics
        self._backoff: dict[str, _Backoff] = {}
        self._load_slots = asyncio.Semaphore(max_parallel_loads)
        self._wake = asyncio.Event()
        self._fleet = Fleet()
        self._lease: Lease | None = None
        self.converged = asyncio.Event()  # set whenever a reconcile pass leaves nothing to do

    async def run(self) -> None:
        """Registers (while the container answers), then reconciles until cancelled."""
        tasks = [asyncio.create_task(self._heartbeat()), asyncio.create_task(self._follow())]
        try:
            await self._reconcile_forever()
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            if self._lease is not None:
                with contextlib.suppress(StoreError, OSError):
                    await self._lease.revoke()

    @property
    def registered(self) -> bool:
        return self._lease is not None

    async def _heartbeat(self) -> None:
        """Keeps the container registered while it answers ServerLive, and withdraws it when it stops.

        Withdrawing (revoking the lease) is what tells the placement controller to re-place its copies; a
        container that comes back is registered again, empty, and gets models from the next plan.
        """
        while True:
            live = await self.adapter.live()
            try:
                if live and self._lease is None:
                    lease = await self.store.grant_lease(self.lease_ttl_s)
                    await registry.register_container(self.store, self.container, lease)
                    self._lease = lease
                    self.loaded.clear()  # a container that (re)starts holds nothing
                    self._wake.set()
                elif live and self._lease is not None:
                    await self._lease.refresh()
                elif self._lease is not None:
                    log.warning("container %s does not answer; withdrawing it", self.container.id)
                    lease, self._lease = self._lease, None
                    self.loaded.clear()
                    await lease.revoke()
            except StoreError as exc:
                # The lease expired (store restarted, or we were too slow): register again next beat.
                log.warning("container %s: heartbeat failed (%s); re-registering", self.container.id, exc)
                self._lease = None
            await asyncio.sleep(self.lease_ttl_s / 3)

    async def _follow(self) -> None:
        """Keeps `_fleet` current: a snapshot, then the watch; reloads on compaction or errors."""
        while True:
            try:
                self._fleet = await registry.load_fleet(self.store)
                self._wake.set()
                async for events in self.store.watch_prefix(registry.ROOT, self._fleet.revision + 1):
                    for event in events:
                        self._fleet.apply(event)
                    if any(e.key.startswith(_RELEVANT) for e in events):
                        self._wake.set()
            except CompactedError:
                continue
            except StoreError as exc:
                log.warning("container %s: store watch failed (%s); retrying", self.container.id, exc)
                await asyncio.sleep(1.0)

    async def _reconcile_forever(self) -> None:
        while True:
            # Clear before the pass, not after: a change that lands during the pass must wake the next one.
            self._wake.clear()
            delay = await self.reconcile()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout=delay)

    async def reconcile(self) -> float | None:
        """One pass: load what is missing, unload what is extra. Returns when to retry failures (s)."""
        if self._lease is None:
            return None  # not registered (container down): nothing to converge until it is back
        fleet = self._fleet
        desired = {
            key: fleet.models[key] for key in fleet.copies_on(self.container.id) if key in fleet.models
        }
        now = time.monotonic()
        to_load = [
            m
            for key, m in desired.items()
            if self.loaded.get(key) != m and self._backoff.get(key, _Backoff()).next_try <= now
        ]
        to_unload = [m for key, m in self.loaded.items() if key not in desired]
        # Loads first: a copy moving here must be up before anything else leaves (make-before-break).
        await asyncio.gather(*(self._load(m) for m in to_load))
        await asyncio.gather(*(self._unload(m) for m in to_unload))
        pending = [b.next_try for key, b in self._backoff.items() if key in desired]
        if not pending and all(self.loaded.get(k) == m for k, m in desired.items()):
            self.converged.set()
        else:
            self.converged.clear()
        return max(0.05, min(pending) - time.monotonic()) if pending else None

    async def _load(self, model: ModelVersion) -> None:
        cid = self.container.id
        async with self._load_slots:
            await self._report(model.key, CopyState("loading"))
            self.load_calls += 1
            started = time.monotonic()
            try:
                await self.adapter.load(model)
            except (LoadError, OSError) as exc:
                self._observe_load("failed", started)
                backoff = self._backoff.setdefault(model.key, _Backoff())
                backoff.attempts += 1
                delay = min(self.retry_max_s, self.retry_base_s * 2 ** (backoff.attempts - 1))
                backoff.next_try = time.monotonic() + delay
                log.warning(
                    "container %s: load of %s failed (%s); retry in %.0f s", cid, model.key, exc, delay
                )
                await self._report(model.key, CopyState("failed", message=str(exc)))
                return
            self._observe_load("ready", started)
            self._backoff.pop(model.key, None)
            self.loaded[model.key] = model
            measured = await self._measure(model)
            await self._report(model.key, CopyState("ready", measured_bytes=measured))

    def _observe_load(self, outcome: str, started: float) -> None:
        if self.telemetry is not None and self.telemetry.metrics:
            self.telemetry.agent_loads.add(1, {"container": self.container.id, "outcome": outcome})
            self.telemetry.agent_load_duration.record(
                time.monotonic() - started, {"container": self.container.id}
            )

    async def _measure(self, model: ModelVersion) -> int:
        """The copy's real footprint (declared sizes lie); 0 when the container cannot tell."""
        try:
            return await self.adapter.footprint(model)
        except Exception as exc:  # measuring is best effort and must never fail a load
            log.warning("container %s: cannot measure %s: %s", self.container.id, model.key, exc)
            return 0

    async def _unload(self, model: ModelVersion) -> None:
        await self._report(model.key, CopyState("unloading"))
        # Routers stop choosing this copy when they see the new map or this state (well under a second);
        # calls already sent finish meanwhile. Triton itself also lets in-flight requests complete.
        await asyncio.sleep(self.drain_s)
        try:
            await self.adapter.unload(model)
        except (LoadError, OSError) as exc:
            log.warning("container %s: unload of %s failed: %s", self.container.id, model.key, exc)
        self.loaded.pop(model.key, None)
        with contextlib.suppress(StoreError):
            await registry.delete_copy_state(self.store, self.container.id, model.key)

    async def _report(self, key: str, state: CopyState) -> None:
        try:
            await registry.put_copy_state(self.store, self.container.id, key, state)
        except StoreError as exc:
            log.warning("container %s: cannot report %s as %s: %s", self.container.id, key, state.phase, exc)
