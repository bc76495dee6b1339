"""The routing table: which version a caller gets and which containers hold it ready. Pure; no I/O.

It wraps a `Fleet` (kept current from the store's watch) with per-model caches, so a lookup on the
request path is a couple of dict reads; each store event invalidates only what it can change.
"""

from __future__ import annotations

import asyncio

from modelyard.placement.model import Container, ModelVersion
from modelyard.placement.registry import Changes, Fleet
from modelyard.placement.store.base import Event
from modelyard.router.versions import resolve_version


class TableWatch:
    """Model names whose routing changed since the watcher last looked (WatchRoutes)."""

    def __init__(self) -> None:
        self.changed: set[str] = set()
        self.everything = False
        self.event = asyncio.Event()

    def take(self) -> tuple[set[str], bool]:
        changed, everything = self.changed, self.everything
        self.changed, self.everything = set(), False
        self.event.clear()
        return changed, everything


MAX_RESOLVED_PER_NAME = 1024  # (version, tenant) choices kept per model name


def _model_name(key: str) -> str:
    return key.rpartition("@")[0] or key


class RoutingTable:
    def __init__(self, fleet: Fleet | None = None) -> None:
        self.fleet = fleet or Fleet()
        self.loaded = fleet is not None
        self._ready: dict[str, tuple[Container, ...]] = {}
        # name -> (requested version, tenant) -> the version resolved, for choices that are not random
        self._resolved: dict[str, dict[tuple[str, str | None], ModelVersion]] = {}
        self._watches: set[TableWatch] = set()
        self._waiters: dict[str, list[asyncio.Future[None]]] = {}

    def watch(self) -> TableWatch:
        watch = TableWatch()
        self._watches.add(watch)
        return watch

    def unwatch(self, watch: TableWatch) -> None:
        self._watches.discard(watch)

    def _notify(self, names: set[str], everything: bool = False) -> None:
        for watch in self._watches:
            watch.changed |= names
            watch.everything |= everything
            watch.event.set()

    async def wait_changed(self, key: str, timeout_s: float) -> None:
        """Returns when anything about model `key` (or the whole table) changes, or after `timeout_s`."""
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.setdefault(key, []).append(future)
        try:
            async with asyncio.timeout(timeout_s):  # not wait_for: it can swallow a cancellation on 3.11
                await future
        except TimeoutError:
            pass
        finally:
            waiters = self._waiters.get(key)
            if waiters is not None and future in waiters:
                waiters.remove(future)
                if not waiters:
                    del self._waiters[key]

    def notify_routes(self) -> None:
        """Every route watcher sends its routes again (what a caller may read of them changed)."""
        self._notify(set(), everything=True)

    def _wake(self, keys: set[str] | None) -> None:
        for key in list(self._waiters) if keys is None else keys & self._waiters.keys():
            for future in self._waiters.pop(key, ()):
                if not future.done():
                    future.set_result(None)

    def replace(self, fleet: Fleet) -> None:
        self.on_change(fleet, Changes(everything=True))

    def apply(self, events: list[Event]) -> None:
        changes = Changes()
        for event in events:
            changes.update(self.fleet.apply(event))
        self.on_change(self.fleet, changes)

    def on_change(self, fleet: Fleet, changes: Changes) -> None:
        """The store follower applied `changes` to `fleet`: drop what they make stale, wake who waits."""
        if changes.everything or fleet is not self.fleet:
            self.fleet = fleet
            self.loaded = True
            self._ready.clear()
            self._resolved.clear()
            self._notify(set(), everything=True)
            self._wake(None)
            return
        for name in changes.routes:
            self._resolved.pop(name, None)
        for key in changes.registrations:
            self._resolved.pop(_model_name(key), None)
        if changes.containers:
            self._ready.clear()
        else:
            for key in changes.models:
                self._ready.pop(key, None)
        if self._watches:
            names = {_model_name(key) for key in changes.models} | changes.routes
            if names or changes.containers:
                self._notify(names, everything=bool(changes.containers))
        if self._waiters:
            self._wake(None if changes.containers or changes.leader else changes.models | changes.wanted)

    def names(self) -> set[str]:
        return set(self.fleet.by_name)

    def versions(self, name: str) -> dict[str, ModelVersion]:
        return self.fleet.by_name.get(name, {})

    def resolve(self, name: str, version: str, tenant: str | None, request_id: str = "") -> ModelVersion:
        """The model version a call for (name, version) from `tenant` goes to (router/versions.py).

        On the call path: a choice that is not random (anything but a weighted split) is made once per
        (name, version, tenant) and kept until the model's registrations or route rule change."""
        cache = self._resolved.get(name)
        if cache is not None:
            model = cache.get((version, tenant))
            if model is not None:
                return model
        rule = self.fleet.routes.get(name)
        model = resolve_version(
            name,
            self.fleet.by_name.get(name),
            requested=version,
            tenant=tenant,
            request_id=request_id,
            rule=rule,
        )
        if version or rule is None or not rule.weights:
            if cache is None:
                cache = self._resolved[name] = {}
            elif len(cache) >= MAX_RESOLVED_PER_NAME:
                cache.clear()  # tenants named in a header are anyone's choice: stay bounded
            cache[(version, tenant)] = model
        return model

    def ready_copies(self, key: str) -> tuple[Container, ...]:
        copies = self._ready.get(key)
        if copies is None:
            fleet = self.fleet
            copies = tuple(
                fleet.containers[cid]
                for cid in fleet.assignments.get(key, ())
                if cid in fleet.containers
                and (state := fleet.states.get((cid, key))) is not None
                and state.phase == "ready"
            )
            self._ready[key] = copies
        return copies
