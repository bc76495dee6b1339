"""The key layout in the store and typed reads and writes on top of it.

One key per model, container, assignment and copy state, so a 100k-model fleet never needs a value or a
transaction beyond etcd's limits, and watchers receive small incremental events:

    /modelyard/models/{name}@{version}          ModelVersion (JSON)
    /modelyard/containers/{id}                  Container (JSON), under the container's lease
    /modelyard/map/generation                   shard map generation (decimal), the planners' CAS guard
    /modelyard/map/assign/{name}@{version}      container ids (JSON list)
    /modelyard/state/{container}/{name}@{version}  CopyState (JSON), written by that container's agent
    /modelyard/routes/{name}                    RouteRule (JSON): default version, tenant pins, split
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from placement.model import Container, CopyState, ModelVersion, RouteRule
from placement.store.base import Event, KeyValue, Lease, Store, StoreError

ROOT = "/modelyard/"
MODELS = ROOT + "models/"
CONTAINERS = ROOT + "containers/"
GENERATION = ROOT + "map/generation"
ASSIGN = ROOT + "map/assign/"
STATE = ROOT + "state/"
ROUTES = ROOT + "routes/"


class ConcurrentPlanError(StoreError):
    """Another planner wrote the shard map first."""


def state_key(container_id: str, key: str) -> str:
    return f"{STATE}{container_id}/{key}"


@dataclass
class Fleet:
    """Everything under /modelyard/ as typed values; built from a snapshot and kept current from events."""

    models: dict[str, ModelVersion] = field(default_factory=dict)
    containers: dict[str, Container] = field(default_factory=dict)
    assignments: dict[str, tuple[str, ...]] = field(default_factory=dict)
    states: dict[tuple[str, str], CopyState] = field(default_factory=dict)  # (container id, model key)
    routes: dict[str, RouteRule] = field(default_factory=dict)  # by model name
    generation: int = 0
    revision: int = 0

    @classmethod
    def from_items(cls, items: Iterable[KeyValue], revision: int) -> Fleet:
        fleet = cls(revision=revision)
        for item in items:
            fleet.apply(Event("put", item.key, item.value, item.mod_revision))
        fleet.revision = revision
        return fleet

    def apply(self, event: Event) -> None:
        """Applies one store event. Values that do not parse are ignored rather than stopping a reader."""
        key, put = event.key, event.kind == "put"
        self.revision = max(self.revision, event.revision)
        try:
            if key.startswith(MODELS):
                name = key[len(MODELS) :]
                if put:
                    self.models[name] = ModelVersion.from_json(event.value)
                else:
                    self.models.pop(name, None)
            elif key.startswith(CONTAINERS):
                cid = key[len(CONTAINERS) :]
                if put:
                    self.containers[cid] = Container.from_json(event.value)
                else:
                    self.containers.pop(cid, None)
            elif key.startswith(ASSIGN):
                name = key[len(ASSIGN) :]
                if put:
                    self.assignments[name] = tuple(json.loads(event.value))
                else:
                    self.assignments.pop(name, None)
            elif key.startswith(STATE):
                cid, _, model = key[len(STATE) :].partition("/")
                if put:
                    self.states[(cid, model)] = CopyState.from_json(event.value)
                else:
                    self.states.pop((cid, model), None)
            elif key.startswith(ROUTES):
                name = key[len(ROUTES) :]
                if put:
                    self.routes[name] = RouteRule.from_json(event.value)
                else:
                    self.routes.pop(name, None)
            elif key == GENERATION:
                self.generation = int(event.value) if put else 0
        except (ValueError, TypeError, KeyError):
            return

    def copies_on(self, container_id: str) -> list[str]:
        """Model keys the shard map assigns to a container, sorted."""
        return sorted(k for k, ids in self.assignments.items() if container_id in ids)


async def load_fleet(store: Store) -> Fleet:
    items, revision = await store.get_prefix(ROOT)
    return Fleet.from_items(items, revision)


async def register_model(store: Store, model: ModelVersion) -> None:
    await store.put(MODELS + model.key, model.to_json())


async def put_route_rule(store: Store, rule: RouteRule) -> None:
    await store.put(ROUTES + rule.model, rule.to_json())


async def delete_route_rule(store: Store, model: str) -> bool:
    return await store.delete(ROUTES + model)


async def register_container(store: Store, container: Container, lease: Lease | None = None) -> None:
    await store.put(CONTAINERS + container.id, container.to_json(), lease=lease)


async def put_copy_state(store: Store, container_id: str, key: str, state: CopyState) -> None:
    await store.put(state_key(container_id, key), state.to_json())


async def delete_copy_state(store: Store, container_id: str, key: str) -> None:
    await store.delete(state_key(container_id, key))


async def read_generation(store: Store) -> int:
    item = await store.get(GENERATION)
    return int(item.value) if item else 0


async def write_shard_map(
    store: Store,
    assignments: Mapping[str, Sequence[str]],
    *,
    expected_generation: int,
) -> int:
    """Replaces the shard map with `assignments` if its generation is still `expected_generation`.

    Only changed keys are written, in batches within etcd's transaction limit; the generation bump rides
    in the first batch with the compare-and-swap, so a concurrent planner fails before writing anything.
    """
    current, _ = await store.get_prefix(ASSIGN)
    existing = {kv.key[len(ASSIGN) :]: kv.value for kv in current}
    puts: dict[str, bytes] = {GENERATION: str(expected_generation + 1).encode()}
    for key, ids in sorted(assignments.items()):
        value = json.dumps(list(ids)).encode()
        if existing.get(key) != value:
            puts[ASSIGN + key] = value
    deletes = [ASSIGN + key for key in sorted(existing) if key not in assignments]
    guard = str(expected_generation).encode() if expected_generation else None
    if not await store.apply(puts, deletes, if_equal=(GENERATION, guard)):
        raise ConcurrentPlanError(
            f"the shard map changed while planning (expected generation {expected_generation}); plan again"
        )
    return expected_generation + 1
