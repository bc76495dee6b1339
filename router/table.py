"""The routing table: which version a caller gets and which containers hold it ready. Pure; no I/O.

It wraps a `Fleet` (kept current from the store's watch) with per-model caches, so a lookup on the
request path is a couple of dict reads; each store event invalidates only what it can change.
"""

from __future__ import annotations

from placement import registry
from placement.model import Container, ModelVersion
from placement.registry import Fleet
from placement.store.base import Event
from router.errors import ModelNotFound
from router.versions import choose_version


class RoutingTable:
    def __init__(self, fleet: Fleet | None = None) -> None:
        self.fleet = fleet or Fleet()
        self.loaded = fleet is not None
        self._ready: dict[str, tuple[Container, ...]] = {}
        self._versions: dict[str, dict[str, ModelVersion]] | None = None

    def replace(self, fleet: Fleet) -> None:
        self.fleet = fleet
        self.loaded = True
        self._ready.clear()
        self._versions = None

    def apply(self, events: list[Event]) -> None:
        for event in events:
            self.fleet.apply(event)
            key = event.key
            if key.startswith(registry.ASSIGN):
                self._ready.pop(key[len(registry.ASSIGN) :], None)
            elif key.startswith(registry.STATE):
                self._ready.pop(key[len(registry.STATE) :].partition("/")[2], None)
            elif key.startswith(registry.MODELS):
                self._versions = None
            elif key.startswith(registry.CONTAINERS):
                self._ready.clear()

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
