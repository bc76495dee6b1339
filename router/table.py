"""The routing table: which version a caller gets and which containers hold it ready. Pure; no I/O.

It wraps a `Fleet` (kept current from the store's watch) with per-model caches, so a lookup on the
request path is a couple of dict reads; each store event invalidates only what it can change.
"""

from __future__ import annotations

import asyncio

from placement import registry
from placement.model import Container, ModelVersion
from placement.registry import Fleet
from placement.store.base import Event
from router.errors import ModelNotFound
from router.versions import choose_version


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


def _model_name(key: str) -> str:
    return key.rpartition("@")[0] or key


class RoutingTable:
    def __init__(self, fleet: Fleet | None = None) -> None:
        self.fleet = fleet or Fleet()
        self.loaded = fleet is not None
        self._ready: dict[str, tuple[Container, ...]] = {}
        self._versions: dict[str, dict[str, ModelVersion]] | None = None
        self._watches: set[TableWatch] = set()

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

    def replace(self, fleet: Fleet) -> None:
        self.fleet = fleet
        self.loaded = True
        self._ready.clear()
        self._versions = None
        self._notify(set(), everything=True)

    def apply(self, events: list[Event]) -> None:
        names: set[str] = set()
        everything = False
        for event in events:
            self.fleet.apply(event)
            key = event.key
            if key.startswith(registry.ASSIGN):
                model = key[len(registry.ASSIGN) :]
                self._ready.pop(model, None)
                names.add(_model_name(model))
            elif key.startswith(registry.STATE):
                model = key[len(registry.STATE) :].partition("/")[2]
                self._ready.pop(model, None)
                names.add(_model_name(model))
            elif key.startswith(registry.MODELS):
                self._versions = None
                names.add(_model_name(key[len(registry.MODELS) :]))
            elif key.startswith(registry.ROUTES):
                names.add(key[len(registry.ROUTES) :])
            elif key.startswith(registry.CONTAINERS):
                self._ready.clear()
                everything = True
        if self._watches and (names or everything):
            self._notify(names, everything)

    def names(self) -> set[str]:
        return set(self._by_name())

    def _by_name(self) -> dict[str, dict[str, ModelVersion]]:
        if self._versions is None:
            versions: dict[str, dict[str, ModelVersion]] = {}
            for model in self.fleet.models.values():
                versions.setdefault(model.name, {})[model.version] = model
            self._versions = versions
        return self._versions

    def versions(self, name: str) -> dict[str, ModelVersion]:
        return self._by_name().get(name, {})

    def resolve(self, name: str, version: str, tenant: str | None, request_id: str = "") -> ModelVersion:
        """The model version a call for (name, version) from `tenant` goes to.

        Versions private to other tenants are invisible: asking for one is NOT_FOUND, exactly as for a
        model that does not exist, so callers cannot probe other tenants' models.
        """
        versions = self._by_name().get(name)
        visible = {v: m for v, m in versions.items() if m.visible_to(tenant)} if versions else {}
        if not visible:
            raise ModelNotFound(f"model '{name}' is not registered")
        chosen = choose_version(
            name,
            visible,
            requested=version,
            tenant=tenant,
            request_id=request_id,
            rule=self.fleet.routes.get(name),
        )
        if chosen is None:
            raise ModelNotFound(f"model '{name}' has no version '{version}'")
        return visible[chosen]

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
