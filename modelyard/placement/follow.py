"""The one store follower: a snapshot of /modelyard/, then its watch, applied to a Fleet.

Router, agents and placement controller all read the fleet through it. It never blocks the event loop: a
snapshot is parsed in a thread, and a burst of events is applied in slices of at most 0.5 ms with a yield
between them. It restarts itself after any error (store down, compacted history, a bug), reports whether it
is current (`healthy`), and tells its listeners what each batch changed.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

from modelyard.memory import long_lived_objects_added, release_freed_memory
from modelyard.placement import registry
from modelyard.placement.registry import Changes, Fleet
from modelyard.placement.store import CompactedError, Store, StoreError
from modelyard.placement.store.base import Event

log = logging.getLogger(__name__)

Listener = Callable[[Fleet, Changes], None]

# Events are applied between two yields to the event loop for at most SLICE_S or SLICE_EVENTS events,
# whichever comes first. A call through the router waits on the loop a dozen times (gRPC's steps and the
# upstream call's), each time behind a slice: at 0.5 ms a call waits ~6 ms more while a burst is applied;
# at 64 events (~3 ms) it waited ~40 ms, measured as warm-caller p99 250-330 ms during a 20k import.
SLICE_S = 0.0005
SLICE_EVENTS = 64
COMMIT_CHUNK = 16  # staged moves a commit takes effect for between two looks at the clock (~40 us)


class _Slice:
    """The events applied since the follower last yielded to the event loop, and since when."""

    def __init__(self) -> None:
        self.restart()

    def restart(self) -> None:
        self.events = 0
        self.until = time.perf_counter() + SLICE_S

    def full(self) -> bool:
        self.events += 1
        return self.events >= SLICE_EVENTS or time.perf_counter() >= self.until


class StoreFollower:
    def __init__(
        self,
        store: Store,
        *,
        name: str,
        retry_s: float = 1.0,
        probe_s: float = 5.0,
        probe_timeout_s: float = 3.0,
    ) -> None:
        self.store = store
        self.name = name
        self.retry_s = retry_s
        # A store that hangs (a paused etcd) sends no error, only silence: a small read every `probe_s`
        # that must answer within `probe_timeout_s` tells silence from a quiet fleet.
        self.probe_s = probe_s
        self.probe_timeout_s = probe_timeout_s
        self._watching = False
        self.fleet = Fleet()
        self.loaded = asyncio.Event()  # set once the first snapshot is in
        self.healthy = False  # current with the store (snapshot loaded, watch running)
        self.unhealthy_since: float | None = time.monotonic()
        self._listeners: list[Listener] = []
        self._health_callbacks: list[Callable[[bool], None]] = []
        self._changed = asyncio.Condition()
        self.version = 0  # bumped after every published change
        self._task: asyncio.Task[None] | None = None
        self._probe_task: asyncio.Task[None] | None = None
        self._slice = _Slice()

    def listen(self, listener: Listener) -> None:
        """`listener(fleet, changes)` runs on the loop after every applied slice (and after a snapshot).

        Several components of one process (router, controller, agents under `modelyard up`) can share one
        follower: one watch, one parse of every event. A listener added late gets the current view at once.
        """
        self._listeners.append(listener)
        if self.loaded.is_set():
            listener(self.fleet, Changes(everything=True))

    def on_health(self, callback: Callable[[bool], None]) -> None:
        """`callback(healthy)` runs whenever the follower becomes current with the store or stops being so."""
        self._health_callbacks.append(callback)

    def unlisten(self, listener: Listener) -> None:
        if listener in self._listeners:
            self._listeners.remove(listener)

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name=f"store-follower-{self.name}")
            self._probe_task = asyncio.create_task(self._probe(), name=f"store-probe-{self.name}")

    async def stop(self, timeout_s: float = 5.0) -> None:
        """Cancels the follower; bounded, because a store client may not finish cancelling a watch."""
        tasks = {t for t in (self._task, self._probe_task) if t is not None}
        for task in tasks:
            task.cancel()
        if tasks:
            done, _ = await asyncio.wait(tasks, timeout=timeout_s)
            if tasks - done:
                log.warning("%s: store watch did not stop within %.0f s; leaving it", self.name, timeout_s)
        self._task = self._probe_task = None

    @property
    def first_load(self) -> asyncio.Event:
        return self.loaded

    @property
    def degraded(self) -> bool:
        """Serving a view the store may have moved past (it was loaded; the watch is down or hung)."""
        return self.loaded.is_set() and not self.healthy

    @property
    def degraded_since(self) -> float | None:
        return self.unhealthy_since if self.degraded else None

    async def wait_changed(self, timeout_s: float | None, seen: int | None = None) -> bool:
        """Waits for a change after `seen` (a `version` read earlier; default: now); False on timeout.

        Read `version` before checking a condition and pass it here, so a change that lands between the
        check and the wait is not missed.
        """
        async with self._changed:
            if seen is not None and self.version != seen:
                return True
            try:
                # asyncio.timeout, not wait_for: on 3.11 wait_for can swallow a cancellation
                async with asyncio.timeout(timeout_s):
                    await self._changed.wait()
            except TimeoutError:
                return False
        return True

    async def _run(self) -> None:
        while True:
            try:
                items, revision = await self.store.get_prefix(registry.ROOT)
                fleet = await asyncio.to_thread(Fleet.from_items, items, revision)
                del items
                self.fleet = fleet
                self._set_healthy(True)
                self.loaded.set()
                await self._publish(Changes(everything=True))  # the last reader lets go of the previous view
                # The parse's peak (the store's values and the previous view, ~100 MiB at 100k models) is
                # free now, but glibc would keep it: a thread, since a big heap takes a while to walk.
                await asyncio.to_thread(release_freed_memory)
                long_lived_objects_added(0, snapshot=True)  # the view, out of the collector's walks
                self._watching = True
                # A store may hand a burst over an event at a time from a queue that never makes this loop
                # wait (etcd's client does): a slice runs on across lists, and is cut as within one.
                async for events in self.store.watch_prefix(registry.ROOT, fleet.revision + 1):
                    await self._apply(events)
                log.info("%s: store watch ended; reloading", self.name)
            except CompactedError:
                log.info("%s: store watch history compacted; reloading", self.name)
                continue
            except StoreError as exc:
                if self.healthy:
                    log.warning("%s: store unreachable (%s); keeping the last view", self.name, exc)
            except asyncio.CancelledError:
                raise
            except Exception:  # a bug must not stop the follower for good: log it, reload, go on
                log.exception("%s: store follower failed; reloading", self.name)
            self._watching = False
            self._set_healthy(False)
            await asyncio.sleep(self.retry_s)

    async def _apply(self, events: list[Event]) -> None:
        fleet, current = self.fleet, self._slice
        changes = Changes()
        for event in events:
            committing = fleet.committing(event)
            if len(committing) > COMMIT_CHUNK:
                # A new shard-map generation commits this many staged moves: taken in slices like a burst
                # of events (registry.Fleet.commit_early), not all in this one event's step.
                for start in range(0, len(committing), COMMIT_CHUNK):
                    fleet.commit_early(committing[start : start + COMMIT_CHUNK], changes)
                    if current.full():
                        changes = await self._yield(changes)
            fleet.apply(event, changes)
            if current.full():
                changes = await self._yield(changes)
        if changes:
            await self._publish(changes)
        long_lived_objects_added(len(events))

    async def _yield(self, changes: Changes) -> Changes:
        """Publishes what the slice changed and lets calls through before the next slice of a big burst."""
        if changes:
            await self._publish(changes)
        await asyncio.sleep(0)
        self._slice.restart()
        return Changes()

    async def _publish(self, changes: Changes) -> None:
        for listener in list(self._listeners):
            try:
                listener(self.fleet, changes)
            except Exception:
                log.exception("%s: a store listener failed", self.name)
        self.version += 1
        async with self._changed:
            self._changed.notify_all()

    def _restart(self) -> None:
        if self._task is not None and not self._task.done():
            self._task.cancel()
        self._watching = False
        self._task = asyncio.create_task(self._run(), name=f"store-follower-{self.name}")

    async def _probe(self) -> None:
        while True:
            await asyncio.sleep(self.probe_s)
            if not self._watching:
                continue
            try:
                async with asyncio.timeout(self.probe_timeout_s):
                    await self.store.get(registry.GENERATION)
            except (StoreError, TimeoutError) as exc:
                if self.healthy:
                    log.warning(
                        "%s: store does not answer (%s); keeping the last view", self.name, exc or "timeout"
                    )
                self._set_healthy(False)
                # The watch may be as silent as the probe (its member cut off, or left without a leader):
                # start over, from a snapshot, through whichever endpoint the store answers on now.
                self._restart()
            else:
                if self._watching and not self.healthy:
                    log.info("%s: store answers again", self.name)
                    self._set_healthy(True)

    def _set_healthy(self, healthy: bool) -> None:
        changed = healthy != self.healthy
        self.healthy = healthy
        self.unhealthy_since = None if healthy else (self.unhealthy_since or time.monotonic())
        if changed:
            for callback in list(self._health_callbacks):
                try:
                    callback(healthy)
                except Exception:
                    log.exception("%s: a health callback failed", self.name)
