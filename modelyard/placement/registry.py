"""The key layout in the store, typed reads and writes on top of it, and the one shard-map write protocol.

One key per model, container, assignment and copy state, so a 100k-model fleet never needs a value or a
transaction beyond etcd's limits, and watchers receive small incremental events:

    /modelyard/models/{name}@{version}          ModelVersion (JSON)
    /modelyard/containers/{id}                  Container (JSON), under the container's lease
    /modelyard/map/generation                   committed shard map generation: "G", or "G:TOKEN" while a
                                                writer stages generation G+1 (the writers' CAS guard)
    /modelyard/map/writer                       the writer of the last map write (in its transaction)
    /modelyard/map/assign/{name}@{version}      {"ids": [...], "gen": G, "prev": [...]}: see below
    /modelyard/state/{container}/{name}@{version}  CopyState (JSON), written by that container's agent
    /modelyard/routes/{name}                    RouteRule (JSON): default version, tenant pins, split
    /modelyard/wanted/{name}@{version}          a router got a call for it and found no copy to load
    /modelyard/controller/leader                the leading placement controller, under its lease
    /modelyard/pipelines/{name}@{version}       Pipeline (JSON, placement/pipeline.py): steps over models
    /modelyard/tenants/{tenant}                 TenantLimits (JSON, placement/tenants.py)
    /modelyard/tenant-default                   TenantLimits of every tenant without an entry
    /modelyard/routers/{router id}              a live router, under its lease (routers share tenant limits)

A map change can be larger than one etcd transaction, yet readers must see it whole or not at all. Each
assignment value carries the generation that wrote it and the ids it had before (`prev`); a reader uses
`ids` when that generation is committed and `prev` while it is still being staged. The writer marks the
generation key as staging, writes its batches (each a compare-and-swap on that mark, so a writer that lost
the lock can never write again), and commits by setting the generation in one last compare-and-swap.
A half-written map is never seen. A follower takes a commit of many moves in slices (`commit_early`):
between them each model's copies are those of the new generation or of the previous one, both committed
(and both ready, moves being make-before-break), and `generation` moves last.
"""

from __future__ import annotations

import json
import logging
import secrets
import sys
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from modelyard.placement.model import Container, CopyState, ModelVersion, RouteRule, split_model_key
from modelyard.placement.pipeline import Pipeline
from modelyard.placement.store.base import MAX_TXN_OPS, Event, KeyValue, Lease, Store, StoreError
from modelyard.placement.tenants import TenantLimits, check_tenant_name

log = logging.getLogger(__name__)

ROOT = "/modelyard/"
MODELS = ROOT + "models/"
CONTAINERS = ROOT + "containers/"
GENERATION = ROOT + "map/generation"
MAP_WRITER = ROOT + "map/writer"  # who wrote the map last: put in every map write's transaction
ASSIGN = ROOT + "map/assign/"
STATE = ROOT + "state/"
ROUTES = ROOT + "routes/"
WANTED = ROOT + "wanted/"
LEADER = ROOT + "controller/leader"
PIPELINES = ROOT + "pipelines/"
TENANTS = ROOT + "tenants/"
TENANT_DEFAULT = ROOT + "tenant-default"
ROUTERS = ROOT + "routers/"
WANT = b"1"  # a wanted key's value while the controller has not answered


class ConcurrentPlanError(StoreError):
    """Another planner wrote the shard map first."""


def state_key(container_id: str, key: str) -> str:
    return f"{STATE}{container_id}/{key}"


@dataclass(frozen=True, slots=True)
class Assignment:
    """One model's assignment value: `ids` from generation `gen` on, `prev` before it."""

    ids: tuple[str, ...]
    gen: int
    prev: tuple[str, ...] = ()

    def to_json(self) -> bytes:
        return json.dumps({"ids": list(self.ids), "gen": self.gen, "prev": list(self.prev)}).encode()

    @classmethod
    def from_json(cls, raw: bytes) -> Assignment:
        data = json.loads(raw.decode())
        if data.__class__ is list:  # written before generations were staged: committed from the start
            data = {"ids": data, "gen": 0, "prev": []}
        if data.__class__ is not dict:
            raise ValueError("expected a JSON object")
        ids, gen, prev = data.get("ids"), data.get("gen", 0), data.get("prev", [])
        for name, value in (("ids", ids), ("prev", prev)):
            if value.__class__ is not list:
                raise ValueError(f"{name}: expected a list of container ids, got {value!r}")
            for x in value:
                if x.__class__ is not str or not x:
                    raise ValueError(f"{name}: expected a list of container ids, got {value!r}")
        if gen.__class__ is not int or gen < 0:
            raise ValueError(f"gen: expected a non-negative integer, got {gen!r}")
        # Container ids recur in every copy: one string each (sys.intern), not one per assignment.
        return cls(tuple(map(sys.intern, ids)), gen, tuple(map(sys.intern, prev)))  # type: ignore[arg-type]


def parse_generation(raw: bytes) -> tuple[int, str]:
    """(committed generation, staging token or "")."""
    text = raw.decode()
    number, _, token = text.partition(":")
    generation = int(number)
    if generation < 0:
        raise ValueError(f"negative generation {generation}")
    return generation, token


@dataclass
class Changes:
    """What one batch of store events changed, as the readers (router, agents, controller) need it."""

    models: set[str] = field(default_factory=set)  # name@version: registration, assignment or copy state
    registrations: set[str] = field(default_factory=set)  # name@version: registration itself
    assigned: set[str] = field(default_factory=set)  # name@version: its committed assignment
    routes: set[str] = field(default_factory=set)  # model names
    containers: set[str] = field(default_factory=set)
    wanted: set[str] = field(default_factory=set)
    pipelines: set[str] = field(default_factory=set)  # name@version
    leader: bool = False
    tenants: bool = False  # a tenant's limits, the default limits, or the set of live routers
    generation: bool = False  # the committed shard map generation moved (even with no assignment changed)
    everything: bool = False  # a fresh snapshot: anything may have changed

    def __bool__(self) -> bool:
        return bool(
            self.models
            or self.routes
            or self.containers
            or self.wanted
            or self.pipelines
            or self.leader
            or self.tenants
            or self.generation
            or self.everything
        )

    def update(self, other: Changes) -> None:
        self.models |= other.models
        self.registrations |= other.registrations
        self.assigned |= other.assigned
        self.routes |= other.routes
        self.containers |= other.containers
        self.wanted |= other.wanted
        self.pipelines |= other.pipelines
        self.leader |= other.leader
        self.tenants |= other.tenants
        self.generation |= other.generation
        self.everything |= other.everything


@dataclass
class Fleet:
    """Everything under /modelyard/ as typed values; built from a snapshot and kept current from events.

    Besides the values it keeps the indexes every pass needs, updated per event, so no pass scans the
    fleet to answer "which copies does container C hold", "what did model M measure" or "which versions
    does name N have": each pass over the fleet is O(models + copies), and an event costs O(its copies).
    """

    models: dict[str, ModelVersion] = field(default_factory=dict)
    containers: dict[str, Container] = field(default_factory=dict)
    assignments: dict[str, tuple[str, ...]] = field(default_factory=dict)  # committed, by model key
    states: dict[tuple[str, str], CopyState] = field(default_factory=dict)  # (container id, model key)
    routes: dict[str, RouteRule] = field(default_factory=dict)  # by model name
    wanted: dict[str, str] = field(default_factory=dict)  # model key -> "" (asked) or why not placed
    pipelines: dict[str, Pipeline] = field(default_factory=dict)  # by name@version
    pipelines_by_name: dict[str, dict[str, Pipeline]] = field(default_factory=dict)  # name -> version -> it
    leader: str = ""
    tenants: dict[str, TenantLimits] = field(default_factory=dict)  # by tenant
    tenant_default: TenantLimits | None = None  # for tenants without an entry
    routers: set[str] = field(default_factory=set)  # live routers (their ids)
    generation: int = 0
    generation_read: bool = False  # a readable generation key was seen (else `generation` is inferred)
    unreadable_generation: bytes | None = None  # the generation key's value while it does not parse
    staging: str = ""  # token of a writer staging generation + 1, if any
    revision: int = 0
    # indexes
    by_name: dict[str, dict[str, ModelVersion]] = field(default_factory=dict)  # name -> version -> model
    by_container: dict[str, set[str]] = field(default_factory=dict)  # container id -> model keys
    # model key -> ((container, bytes), ...): pairs, not a dict per model (a third of the size, at one copy)
    measured: dict[str, tuple[tuple[str, int], ...]] = field(default_factory=dict)
    used: dict[str, int] = field(default_factory=dict)  # container id -> budget of the copies assigned to it
    cost: dict[str, int] = field(default_factory=dict)  # model key -> the per-copy budget counted in `used`
    raw_assignments: dict[str, Assignment] = field(default_factory=dict)
    # model key -> containers that refused to load it for lack of memory (CopyState.container_full)
    full_copies: dict[str, set[str]] = field(default_factory=dict)
    _pending: dict[int, set[str]] = field(default_factory=dict)  # generation -> keys staged for it
    skipped: int = 0  # store values that did not parse
    # Store keys whose current value does not parse. A model key here is registered, just unreadable (a
    # bad write, or a newer writer's format): its copies stay assigned instead of being dropped.
    unparsable: set[str] = field(default_factory=set)

    @classmethod
    def from_items(cls, items: Iterable[KeyValue], revision: int) -> Fleet:
        fleet = cls(revision=revision)
        ignored = Changes()  # a snapshot: every reader starts over from it anyway
        for item in items:
            fleet.apply(Event("put", item.key, item.value, item.mod_revision), ignored)
        fleet.revision = revision
        return fleet

    @classmethod
    def of(
        cls,
        *,
        models: Iterable[ModelVersion] = (),
        containers: Iterable[Container] = (),
        assignments: Mapping[str, Sequence[str]] | None = None,
        states: Mapping[tuple[str, str], CopyState] | None = None,
        routes: Iterable[RouteRule] = (),
    ) -> Fleet:
        """A fleet with these values and its indexes, as a store holding them would give (for pure code)."""
        fleet = cls()
        puts = [
            *((MODELS + m.key, m.to_json()) for m in models),
            *((CONTAINERS + c.id, c.to_json()) for c in containers),
            *((ASSIGN + k, Assignment(tuple(ids), 0).to_json()) for k, ids in (assignments or {}).items()),
            *((state_key(cid, k), s.to_json()) for (cid, k), s in (states or {}).items()),
            *((ROUTES + r.model, r.to_json()) for r in routes),
        ]
        for revision, (key, value) in enumerate(puts, 1):
            fleet.apply(Event("put", key, value, revision))
        return fleet

    # -- reads ---------------------------------------------------------------------------------------

    def copies_on(self, container_id: str) -> list[str]:
        """Model keys the shard map assigns to a container, sorted."""
        return sorted(self.by_container.get(container_id, ()))

    def budget_bytes(self, model: ModelVersion) -> int:
        """What a copy costs: max(declared, measured), since declared sizes lie."""
        measured = self.measured.get(model.key)
        return max(model.memory_bytes, *(size for _, size in measured)) if measured else model.memory_bytes

    def full_containers(self) -> set[str]:
        """Containers that refused a load for lack of memory while that failed copy's state stands."""
        return set().union(*self.full_copies.values()) if self.full_copies else set()

    def ready_on(self, key: str) -> list[str]:
        """Live containers holding a ready copy of `key`."""
        return [
            cid
            for cid in self.assignments.get(key, ())
            if cid in self.containers
            and (state := self.states.get((cid, key))) is not None
            and state.phase == "ready"
        ]

    # -- events --------------------------------------------------------------------------------------

    def apply(self, event: Event, changes: Changes | None = None) -> Changes:
        """Applies one store event, adding what it changed to `changes` (or a new Changes) and returning
        it. A value that does not parse is skipped with one log line naming it."""
        if changes is None:
            changes = Changes()
        self.revision = max(self.revision, event.revision)
        try:
            self._apply(event, changes)
            self.unparsable.discard(event.key)
        except (ValueError, TypeError, KeyError, AttributeError, UnicodeDecodeError) as exc:
            self.skipped += 1
            if event.kind == "put":
                self.unparsable.add(event.key)
            log.warning("store key %s: skipped, its value does not parse (%s)", event.key, exc)
        return changes

    def _apply(self, event: Event, changes: Changes) -> None:
        # Model keys and container ids recur in several indexes and in the keys of every copy's state and
        # assignment: each is one string (sys.intern), not one per store key it was read from.
        key, put = event.key, event.kind == "put"
        if key.startswith(MODELS):
            mkey = sys.intern(key[len(MODELS) :])
            name, version = split_model_key(mkey)
            if put:
                model = ModelVersion.from_json(event.value)
                if model.key != mkey:
                    raise ValueError(f"registered as {model.key}")
                self.models[mkey] = model
                if name == model.name:
                    name = model.name  # the model's own string, not one more per name
                self.by_name.setdefault(name, {})[version] = model
            else:
                self.models.pop(mkey, None)
                versions = self.by_name.get(name)
                if versions is not None:
                    versions.pop(version, None)
                    if not versions:
                        del self.by_name[name]
            self._recost(mkey)
            changes.models.add(mkey)
            changes.registrations.add(mkey)
        elif key.startswith(CONTAINERS):
            cid = sys.intern(key[len(CONTAINERS) :])
            if put:
                container = Container.from_json(event.value)
                if container.id != cid:
                    raise ValueError(f"container value names {container.id!r}")
                self.containers[cid] = container
            else:
                self.containers.pop(cid, None)
            changes.containers.add(cid)
        elif key.startswith(ASSIGN):
            mkey = sys.intern(key[len(ASSIGN) :])
            split_model_key(mkey)
            if put:
                value = Assignment.from_json(event.value)
                old = self.raw_assignments.get(mkey)
                if old is not None and old.gen > self.generation:
                    self._pending.get(old.gen, set()).discard(mkey)
                self.raw_assignments[mkey] = value
                if value.gen > self.generation:
                    self._pending.setdefault(value.gen, set()).add(mkey)
                    self._set_assignment(mkey, value.prev, changes)
                else:
                    self._set_assignment(mkey, value.ids, changes)
            else:
                old = self.raw_assignments.pop(mkey, None)
                if old is not None and old.gen > self.generation:
                    self._pending.get(old.gen, set()).discard(mkey)
                self._set_assignment(mkey, (), changes)
        elif key.startswith(STATE):
            cid, _, mkey = key[len(STATE) :].partition("/")
            cid, mkey = sys.intern(cid), sys.intern(mkey)
            split_model_key(mkey)
            if put:
                state = CopyState.from_json(event.value)
                self.states[(cid, mkey)] = state
                if state.measured_bytes:
                    others = tuple(pair for pair in self.measured.get(mkey, ()) if pair[0] != cid)
                    self.measured[mkey] = (*others, (cid, state.measured_bytes))
                else:
                    self._forget_measure(mkey, cid)
                full = state.container_full and state.phase == "failed"
            else:
                self.states.pop((cid, mkey), None)
                self._forget_measure(mkey, cid)
                full = False
            if full:
                self.full_copies.setdefault(mkey, set()).add(cid)
            elif mkey in self.full_copies:
                self.full_copies[mkey].discard(cid)
                if not self.full_copies[mkey]:
                    del self.full_copies[mkey]
            self._recost(mkey)
            changes.models.add(mkey)
        elif key.startswith(ROUTES):
            name = key[len(ROUTES) :]
            if put:
                rule = RouteRule.from_json(event.value)
                if rule.model != name:
                    raise ValueError(f"route rule names model {rule.model!r}")
                self.routes[name] = rule
            else:
                self.routes.pop(name, None)
            changes.routes.add(name)
        elif key.startswith(WANTED):
            mkey = sys.intern(key[len(WANTED) :])
            split_model_key(mkey)
            if put:
                self.wanted[mkey] = "" if event.value in (b"", WANT) else event.value.decode()
            else:
                self.wanted.pop(mkey, None)
            changes.wanted.add(mkey)
        elif key.startswith(PIPELINES):
            pkey = key[len(PIPELINES) :]
            name, version = split_model_key(pkey)
            if put:
                pipeline = Pipeline.from_json(event.value)
                if pipeline.key != pkey:
                    raise ValueError(f"registered as {pipeline.key}")
                self.pipelines[pkey] = pipeline
                self.pipelines_by_name.setdefault(name, {})[version] = pipeline
            else:
                self.pipelines.pop(pkey, None)
                pipeline_versions = self.pipelines_by_name.get(name)
                if pipeline_versions is not None:
                    pipeline_versions.pop(version, None)
                    if not pipeline_versions:
                        del self.pipelines_by_name[name]
            changes.pipelines.add(pkey)
        elif key == LEADER:
            self.leader = event.value.decode() if put else ""
            changes.leader = True
        elif key.startswith(TENANTS):
            tenant = check_tenant_name(key[len(TENANTS) :])
            if put:
                self.tenants[tenant] = TenantLimits.from_json(event.value)
            else:
                self.tenants.pop(tenant, None)
            changes.tenants = True
        elif key == TENANT_DEFAULT:
            self.tenant_default = TenantLimits.from_json(event.value) if put else None
            changes.tenants = True
        elif key.startswith(ROUTERS):
            if put:
                self.routers.add(key[len(ROUTERS) :])
            else:
                self.routers.discard(key[len(ROUTERS) :])
            changes.tenants = True
        elif key == GENERATION:
            self.unreadable_generation = None
            if put:
                try:
                    generation, token = parse_generation(event.value)
                except (ValueError, UnicodeDecodeError):
                    self._unreadable_generation(event.value, changes)
                    raise  # skipped with its log line, like any value that does not parse
                self.generation_read = True
            else:
                generation, token = 0, ""
            self.staging = token
            if generation != self.generation:
                self._commit(generation, changes)

    def _unreadable_generation(self, value: bytes, changes: Changes) -> None:
        """The generation key holds garbage. One bad key is never "no map": a reader that read a good
        generation before keeps it; a fresh one takes the newest generation its assignments carry (each
        was committed, or staged by a writer the garbage has fenced out: nothing can commit past garbage).
        Writers compare against the garbage itself, so the next map write repairs the key."""
        self.unreadable_generation = value
        self.staging = ""
        if not self.generation_read:
            newest = max((a.gen for a in self.raw_assignments.values()), default=0)
            if newest != self.generation:
                self._commit(newest, changes)

    def committing(self, event: Event) -> list[str]:
        """The staged assignments that `event`, if it commits a newer shard-map generation, makes take
        effect: a follower may take them in slices (`commit_early`) before it applies the event itself, so
        a commit of 100k moves does not hold its loop in one step. Empty for any other event."""
        if event.key != GENERATION or event.kind != "put" or not self._pending:
            return []
        try:
            generation, _ = parse_generation(event.value)
        except (ValueError, UnicodeDecodeError):
            return []  # applied (and logged) as one step
        if generation <= self.generation:
            return []  # going back re-stages: one step
        return self._staged_up_to(generation)

    def _staged_up_to(self, generation: int) -> list[str]:
        return [mkey for gen, keys in self._pending.items() if gen <= generation for mkey in keys]

    def commit_early(self, mkeys: Iterable[str], changes: Changes) -> None:
        """The committed assignments of `mkeys` (from `committing`) take effect now, ahead of the generation
        event that commits them. Until that event is applied a reader sees some of the new generation's
        assignments and the rest of the previous one's: each model's copies are one generation's or the
        other's, every one of them committed in the store, and `generation` (what a writer waits for, and
        compares against) moves only with the event."""
        for mkey in mkeys:
            value = self.raw_assignments.get(mkey)
            if value is None:
                continue
            staged = self._pending.get(value.gen)
            if staged is None or mkey not in staged:
                continue
            staged.discard(mkey)
            if not staged:
                del self._pending[value.gen]
            self._set_assignment(mkey, value.ids, changes)

    def _commit(self, generation: int, changes: Changes) -> None:
        """The committed generation moved: staged assignments up to it take effect (or, going back, not)."""
        went_back = generation < self.generation
        self.generation = generation
        changes.generation = True  # published even when no assignment changes: a writer waits for it
        self.commit_early(self._staged_up_to(generation), changes)  # what a follower has not taken already
        if not went_back:
            return
        # A generation that went back (a store restored from a backup) re-stages what is now ahead of it.
        for mkey, value in self.raw_assignments.items():
            if value.gen > generation and mkey not in self._pending.get(value.gen, ()):
                self._pending.setdefault(value.gen, set()).add(mkey)
                self._set_assignment(mkey, value.prev, changes)

    def _set_assignment(self, mkey: str, ids: tuple[str, ...], changes: Changes) -> None:
        old = self.assignments.get(mkey, ())
        if old == ids:
            return
        cost = self.cost.get(mkey, 0)
        for cid in old:
            held = self.by_container.get(cid)
            if held is not None:
                held.discard(mkey)
                if not held:
                    del self.by_container[cid]
            if cost:
                self.used[cid] -= cost
                if not self.used[cid]:
                    del self.used[cid]
        for cid in ids:
            self.by_container.setdefault(cid, set()).add(mkey)
            if cost:
                self.used[cid] = self.used.get(cid, 0) + cost
        if ids:
            self.assignments[mkey] = ids
        else:
            self.assignments.pop(mkey, None)
        changes.models.add(mkey)
        changes.assigned.add(mkey)

    def _recost(self, mkey: str) -> None:
        """Keeps `used` right when a model's per-copy budget changes (registered, removed, measured)."""
        model = self.models.get(mkey)
        new = self.budget_bytes(model) if model is not None else 0
        old = self.cost.get(mkey, 0)
        if new == old:
            return
        for cid in self.assignments.get(mkey, ()):
            self.used[cid] = self.used.get(cid, 0) + new - old
            if not self.used[cid]:
                del self.used[cid]
        if new:
            self.cost[mkey] = new
        else:
            del self.cost[mkey]

    def _forget_measure(self, mkey: str, cid: str) -> None:
        measured = self.measured.get(mkey)
        if measured is not None:
            others = tuple(pair for pair in measured if pair[0] != cid)
            if others:
                self.measured[mkey] = others
            else:
                del self.measured[mkey]


async def load_fleet(store: Store) -> Fleet:
    items, revision = await store.get_prefix(ROOT)
    return Fleet.from_items(items, revision)


async def register_model(store: Store, model: ModelVersion) -> None:
    await store.put(MODELS + model.key, model.to_json())


async def read_model(store: Store, key: str) -> KeyValue | None:
    """The registry entry of model `key` (name@version) as stored, or None."""
    return await store.get(MODELS + key)


async def create_model(store: Store, model: ModelVersion) -> bool:
    """Registers `model` only if its version is not registered yet (compare-and-swap); False if it is."""
    return await store.apply({MODELS + model.key: model.to_json()}, if_equal=(MODELS + model.key, None))


async def create_models(store: Store, models: Sequence[ModelVersion]) -> dict[str, bytes]:
    """Registers every model not registered yet, in batches; returns the stored value of those that were
    (by model key), which this call left alone."""
    present = await store.put_absent({MODELS + m.key: m.to_json() for m in models})
    return {key[len(MODELS) :]: value for key, value in present.items()}


async def replace_model(store: Store, entry: KeyValue, model: ModelVersion) -> bool:
    """Writes `model` over the registry entry `entry` (read with `read_model`) only if it is still exactly
    that entry (compare-and-swap); False if it changed meanwhile."""
    if entry.key != MODELS + model.key:
        raise ValueError(f"{entry.key} is not the registry entry of {model.key}")
    return await store.apply({entry.key: model.to_json()}, if_equal=(entry.key, entry.value))


async def delete_model_if(store: Store, entry: KeyValue) -> bool:
    """Unregisters the model of `entry` (read with `read_model`) if its entry is still exactly that."""
    if not entry.key.startswith(MODELS):
        raise ValueError(f"not a registry entry: {entry.key}")
    return await store.apply({}, [entry.key], if_equal=(entry.key, entry.value))


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


async def want_model(store: Store, key: str) -> int:
    """Asks the placement controller to place `key` now (a call is waiting for it); returns the revision."""
    return await store.put(WANTED + key, WANT)


async def read_generation(store: Store) -> int | None:
    """The committed generation as stored; None when the key holds a value that does not parse."""
    item = await store.get(GENERATION)
    if item is None:
        return 0
    try:
        return parse_generation(item.value)[0]
    except (ValueError, UnicodeDecodeError):
        return None


def _generation_value(generation: int, token: str = "") -> bytes | None:
    if not generation and not token:
        return None  # generation 0 is an absent key
    return f"{generation}:{token}".encode() if token else str(generation).encode()


async def update_shard_map(
    store: Store,
    changes: Mapping[str, Sequence[str]],
    *,
    base: Fleet,
    writer: str = "",
    bump: bool = False,
) -> int:
    """Changes the assignments of the models in `changes` (empty: unassigned) as one new generation.

    `base` is the caller's current view of the store (a followed Fleet): the new generation is base's + 1
    and is refused (ConcurrentPlanError, nothing visible) if the store's map moved past it. Readers see all
    of the change or none of it, however many transactions it takes. Callers hold the rebalance lock.
    `writer` names the writer in MAP_WRITER in every transaction (the store's history then says who wrote
    each revision of the map); `bump` commits a new generation even with nothing to change, which fences
    out every write a previous writer still has in flight (they compare against the generation before).
    """
    generation = base.generation
    if base.staging:
        await abort_staging(store, base)
    puts: dict[str, bytes] = {}
    for mkey, ids in changes.items():
        new = tuple(dict.fromkeys(ids))
        current = base.assignments.get(mkey, ())
        raw = base.raw_assignments.get(mkey)
        if new == current and (raw is None or raw.gen <= generation):
            continue
        puts[ASSIGN + mkey] = Assignment(new, generation + 1, current).to_json()
    # Tombstones of earlier generations change nothing any reader sees: they can go in any batch.
    deletes = [
        ASSIGN + mkey
        for mkey, raw in base.raw_assignments.items()
        if not raw.ids and raw.gen <= generation and ASSIGN + mkey not in puts
    ][: MAX_TXN_OPS * 10]
    # A generation key holding garbage is replaced by this write (compared as it is).
    idle = _generation_value(generation)
    if base.unreadable_generation is not None:
        idle = base.unreadable_generation
    committed = str(generation + 1).encode()
    if not puts and not deletes and not bump:
        return generation
    signed = {MAP_WRITER: writer.encode()} if writer else {}
    if len(puts) + len(deletes) < MAX_TXN_OPS:
        if not await store.apply(
            {**puts, GENERATION: committed, **signed}, deletes, if_equal=(GENERATION, idle)
        ):
            raise _moved(generation)
        return generation + 1
    token = secrets.token_hex(8)
    staging = _generation_value(generation, token)
    if not await store.apply({GENERATION: staging or b"", **signed}, if_equal=(GENERATION, idle)):
        raise _moved(generation)
    ops: list[tuple[str, bytes | None]] = [*puts.items(), *((k, None) for k in deletes)]
    for start in range(0, len(ops), MAX_TXN_OPS - 1):
        batch = ops[start : start + MAX_TXN_OPS - 1]
        batch_puts = {k: v for k, v in batch if v is not None}
        batch_deletes = [k for k, v in batch if v is None]
        if not await store.apply(batch_puts, batch_deletes, if_equal=(GENERATION, staging)):
            raise ConcurrentPlanError(
                f"another writer took over the shard map while generation {generation + 1} was staged"
            )
    if not await store.apply({GENERATION: committed, **signed}, if_equal=(GENERATION, staging)):
        raise ConcurrentPlanError(
            f"another writer took over the shard map while generation {generation + 1} was staged"
        )
    return generation + 1


async def abort_staging(store: Store, base: Fleet) -> None:
    """Undoes a staged generation whose writer lost the rebalance lock (it died or hung).

    Only a writer that holds the lock calls this: the staged values go back to what they were, then the
    staging mark is cleared, each step a compare-and-swap on that mark.
    """
    generation, token = base.generation, base.staging
    staging = _generation_value(generation, token)
    staged = [(mkey, raw) for mkey, raw in base.raw_assignments.items() if raw.gen > generation]
    log.warning(
        "shard map: undoing generation %d staged by a writer that lost the lock (%d keys)",
        generation + 1,
        len(staged),
    )
    for start in range(0, len(staged), MAX_TXN_OPS - 1):
        batch = {
            ASSIGN + mkey: Assignment(raw.prev, generation, raw.prev).to_json()
            for mkey, raw in staged[start : start + MAX_TXN_OPS - 1]
        }
        if not await store.apply(batch, if_equal=(GENERATION, staging)):
            raise _moved(generation)
    idle = _generation_value(generation)
    cleared = await (
        store.apply({GENERATION: idle}, if_equal=(GENERATION, staging))
        if idle is not None
        else store.apply({}, [GENERATION], if_equal=(GENERATION, staging))
    )
    if not cleared:
        raise _moved(generation)
    base.staging = ""


async def put_tenant_limits(
    store: Store, tenant: str | None, limits: TenantLimits, old: KeyValue | None
) -> bool:
    """Writes `tenant`'s limits (None: the default) only if its entry is still `old` (compare-and-swap)."""
    key = tenant_key(tenant)
    return await store.apply({key: limits.to_json()}, if_equal=(key, old.value if old else None))


def tenant_key(tenant: str | None) -> str:
    """The store key of `tenant`'s limits (None: the default entry)."""
    return TENANT_DEFAULT if tenant is None else TENANTS + check_tenant_name(tenant)


def _moved(generation: int) -> ConcurrentPlanError:
    return ConcurrentPlanError(
        f"the shard map changed while planning (expected generation {generation}); plan again"
    )


async def write_shard_map(
    store: Store,
    assignments: Mapping[str, Sequence[str]],
    *,
    expected_generation: int | None = None,
    base: Fleet | None = None,
) -> int:
    """Replaces the whole shard map with `assignments` (only changed keys are written).

    With `base`, relative to that view; else the store is read first and its generation must be
    `expected_generation`.
    """
    if base is None:
        base = await load_fleet(store)
        if expected_generation is not None and base.generation != expected_generation:
            raise _moved(expected_generation)
    changes: dict[str, Sequence[str]] = dict(assignments)
    for mkey in base.assignments:
        if mkey not in assignments:
            changes[mkey] = ()
    return await update_shard_map(store, changes, base=base)
