"""Copies follow load, and memory as a cache: the policy, as pure functions (no I/O, no clock).

Given each model's call rate (summed across routers), its copies and the room left on each container, it
decides which copies to add and which to remove:

- a model whose rate per ready copy has stayed above the target for `scale_up_after_s` gets one more copy
  (up to its `max_replicas`, within a container's memory budget, on a container that does not hold it);
- a model whose rate would stay below `down_fraction` x the target with one copy fewer, for
  `scale_down_after_s`, loses one (down to `replicas`; a load-on-demand model keeps its one copy while
  resident). The band between the two thresholds is the hysteresis: a load near the target never flaps,
  and at most one copy goes per model per `scale_down_after_s`;
- when memory is short, hotter models are served first, and room is made by evicting load-on-demand
  copies least recently used first, never one called within `evict_idle_s` nor a model a call waits for.

The controller (placement/autoscaler.py) feeds it the store and applies its decisions make-before-break:
a new copy is only added to the map (routers use it once ready); a removed copy leaves the map first, so
routers stop sending to it, and its agent drains it before unloading it.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

from modelyard.placement.model import ModelVersion
from modelyard.placement.registry import Fleet


@dataclass(frozen=True)
class Policy:
    copy_target_rps: float = 0.0  # calls/s one copy should take; 0: copies do not follow load
    scale_down_after_s: float = 300.0
    scale_up_after_s: float = 0.0  # how long the rate must stay above the target before a copy is added
    down_fraction: float = 0.5  # a copy goes only if the rest would stay below this x the target
    evict_idle_s: float = 2.0  # a load-on-demand copy called more recently than this is never evicted


@dataclass(frozen=True)
class ModelLoad:
    """What the policy knows of one model version."""

    key: str
    backend: str
    kind: str  # gpu | cpu | any
    cost_bytes: int  # per copy: max(declared, measured)
    replicas: int  # the floor (0: load on demand)
    most_copies: int  # the ceiling
    copies: tuple[str, ...]  # live containers assigned a copy
    ready: int  # of them, ready
    rate: float = 0.0  # calls/s
    idle_s: float = math.inf  # since its last call
    wanted: bool = False  # a call waits for a copy (lazy load)

    @property
    def on_demand(self) -> bool:
        return self.replicas == 0

    @property
    def rate_per_copy(self) -> float:
        return self.rate / max(self.ready, 1)


@dataclass(frozen=True)
class Room:
    """A live container: free bytes (budget minus copies assigned and copies still draining)."""

    id: str
    backend: str
    kind: str  # gpu | cpu
    free_bytes: int
    # Bytes of copies draining there that no waiting model has claimed yet: free once they unload.
    draining_bytes: int = 0


@dataclass
class Timers:
    """When each model's rate went above / below its thresholds: the policy's memory between passes."""

    above_since: dict[str, float] = field(default_factory=dict)
    below_since: dict[str, float] = field(default_factory=dict)


Action = Literal["add", "remove", "evict", "no room"]


@dataclass(frozen=True)
class Decision:
    action: Action
    model: str
    container: str  # "" for "no room"
    why: str

    def line(self) -> str:
        where = f" on {self.container}" if self.container else ""
        return f"{self.action} {self.model}{where}: {self.why}"


@dataclass(frozen=True)
class Plan:
    changes: dict[str, tuple[str, ...]]  # model key -> its new live copies
    decisions: list[Decision]
    waiting: set[str]  # wanted models whose room is being made (evictions draining, or soon idle copies)
    blocked: dict[str, str]  # wanted models no eviction can ever make room for -> why
    # model -> (container, bytes): the draining room evicted for it, so no other waiting model counts on it
    claims: dict[str, tuple[str, int]] = field(default_factory=dict)


def scale_target(load: ModelLoad, policy: Policy, timers: Timers, now: float) -> int:
    """How many copies `load` should have now: one more, one fewer or as many as it has (thresholds over
    time, with hysteresis). Updates `timers`."""
    key, current = load.key, len(load.copies)
    floor = max(load.replicas, 1 if current else 0)
    if current > max(load.most_copies, floor):  # the ceiling was lowered (models set): one goes per pass
        timers.above_since.pop(key, None)
        timers.below_since.pop(key, None)
        return current - 1
    if policy.copy_target_rps <= 0 or current == 0:
        timers.above_since.pop(key, None)
        timers.below_since.pop(key, None)
        return max(current, load.replicas)
    target = policy.copy_target_rps
    if load.rate_per_copy > target:
        timers.below_since.pop(key, None)
        # One copy at a time: the next only once every copy is ready and the rate still stays high.
        if current >= load.most_copies or load.ready < current:
            timers.above_since.pop(key, None)
            return current
        since = timers.above_since.setdefault(key, now)
        if now - since >= policy.scale_up_after_s:
            timers.above_since.pop(key, None)
            return current + 1
        return current
    timers.above_since.pop(key, None)
    if current > floor and load.rate / (current - 1) < policy.down_fraction * target:
        since = timers.below_since.setdefault(key, now)
        if now - since >= policy.scale_down_after_s:
            timers.below_since[key] = now  # the next copy may go one quiet period later
            return current - 1
        return current
    timers.below_since.pop(key, None)
    return max(current, floor)


def _fits(load: ModelLoad, room: Room) -> bool:
    return (
        room.backend == load.backend
        and (load.kind == "any" or load.kind == room.kind)
        and room.id not in load.copies
    )


def _evictable(victim: ModelLoad, policy: Policy) -> bool:
    """A load-on-demand copy no call needs now: idle long enough, fully loaded, not waited for."""
    return (
        victim.on_demand
        and not victim.wanted
        and victim.ready == len(victim.copies) > 0
        and victim.idle_s >= policy.evict_idle_s
    )


def no_container_up(backend: str, kind: str) -> str:
    """Why nothing can be placed when no live container of the backend (and kind) exists at all."""
    return f"no {backend} container{'' if kind == 'any' else f' of kind {kind}'} is up"


def make_room(
    load: ModelLoad, rooms: Sequence[Room], loads: Iterable[ModelLoad], policy: Policy
) -> tuple[str, list[ModelLoad]] | Literal["wait", "never"]:
    """Where `load` gets a copy once some load-on-demand copies are evicted: (container, victims) taken
    least recently used first, on the first container where they free enough (no victims: copies draining
    there already free enough). "wait": copies that could go are not idle yet; "never": no eviction can
    make room."""
    candidates = [r for r in rooms if _fits(load, r)]
    if not candidates:
        return "never"
    for room in candidates:  # room that draining copies will free, and nobody counts on yet: claim it
        if room.free_bytes + room.draining_bytes >= load.cost_bytes:
            return room.id, []
    by_id = {r.id: r for r in candidates}
    freed = {r.id: r.free_bytes + r.draining_bytes for r in candidates}
    chosen: dict[str, list[ModelLoad]] = {}
    # A call waiting wins over any idle copy; an extra copy for load only over colder models.
    victims = [v for v in loads if v.on_demand and v.key != load.key and (load.wanted or v.rate < load.rate)]
    later = False
    for victim in sorted(victims, key=lambda v: (-v.idle_s, v.rate, v.key)):
        if not _evictable(victim, policy):
            later = later or any(cid in by_id for cid in victim.copies)
            continue
        for cid in victim.copies:
            if cid not in by_id:
                continue
            freed[cid] += victim.cost_bytes
            chosen.setdefault(cid, []).append(victim)
            if freed[cid] >= load.cost_bytes:
                return cid, chosen[cid]
    # Even every evictable copy gone would not do: the rest is held by models' floors (or hotter ones).
    return "wait" if later else "never"


def plan_autoscale(
    loads: Sequence[ModelLoad], rooms: Sequence[Room], policy: Policy, timers: Timers, now: float
) -> Plan:
    """One pass of the policy over the models that matter now (called, holding extra copies, resident on
    demand, or wanted). Pure but for `timers`."""
    changes: dict[str, tuple[str, ...]] = {}
    decisions: list[Decision] = []
    waiting: set[str] = set()
    blocked: dict[str, str] = {}
    claims: dict[str, tuple[str, int]] = {}
    free = {r.id: r for r in rooms}
    by_key = {load.key: load for load in loads}
    evicted: set[tuple[str, str]] = set()
    # Removals first (their room is not reused before they drain), then additions, hottest first.
    adds: list[ModelLoad] = []
    for load in loads:
        if load.wanted and not load.copies:
            adds.append(load)
            continue
        target = scale_target(load, policy, timers, now)
        if target < len(load.copies):
            gone = _least_useful(load)
            changes[load.key] = tuple(c for c in load.copies if c != gone)
            why = (
                f"{len(load.copies)} copies, above its max replicas {load.most_copies}"
                if len(load.copies) > load.most_copies
                else f"{load.rate:.1f} calls/s on {len(load.copies)} copies stayed below "
                f"{policy.down_fraction:g} x {policy.copy_target_rps:g}/copy for "
                f"{policy.scale_down_after_s:g} s"
            )
            decisions.append(Decision("remove", load.key, gone, why))
        elif target > len(load.copies):
            adds.append(load)
    adds.sort(key=lambda m: (not m.wanted, -m.rate_per_copy, m.key))
    for load in adds:
        fitting = [r for r in free.values() if _fits(load, r) and r.free_bytes >= load.cost_bytes]
        if fitting:
            if load.wanted and not load.copies:
                continue  # room exists: the controller's incremental placement places it
            room = max(fitting, key=lambda r: (r.free_bytes, r.id))
            free[room.id] = Room(room.id, room.backend, room.kind, room.free_bytes - load.cost_bytes)
            changes[load.key] = (*load.copies, room.id)
            decisions.append(
                Decision(
                    "add",
                    load.key,
                    room.id,
                    f"{load.rate:.1f} calls/s on {load.ready} ready copies stayed above "
                    f"{policy.copy_target_rps:g}/copy",
                )
            )
            continue
        live = [by_key[k] for k in by_key if k not in changes]
        found = make_room(load, list(free.values()), live, policy)
        if found == "never":
            kinds = {r.kind for r in rooms if r.backend == load.backend}
            if not kinds:
                why = no_container_up(load.backend, "any")
            elif load.kind != "any" and load.kind not in kinds:
                why = no_container_up(load.backend, load.kind)
            else:
                why = f"no {load.backend} container can make room for {load.cost_bytes} bytes"
            if load.wanted and not load.copies:
                blocked[load.key] = why
            decisions.append(Decision("no room", load.key, "", why))
            continue
        if found == "wait":
            if load.wanted:
                waiting.add(load.key)
            continue
        cid, victims = found
        for victim in victims:
            if (victim.key, cid) in evicted:
                continue
            evicted.add((victim.key, cid))
            remaining = tuple(c for c in changes.get(victim.key, victim.copies) if c != cid)
            changes[victim.key] = remaining
            by_key.pop(victim.key, None)
            room = free[cid]
            free[cid] = Room(room.id, room.backend, room.kind, room.free_bytes, room.draining_bytes)
            decisions.append(
                Decision(
                    "evict",
                    victim.key,
                    cid,
                    f"least recently used (idle {victim.idle_s:.0f} s); room for {load.key} "
                    f"({load.rate:.1f} calls/s{', a call waits' if load.wanted else ''})",
                )
            )
        # The draining room on `cid` (what was draining there before, and these victims) is this model's.
        room = free[cid]
        claims[load.key] = (cid, load.cost_bytes)
        free[cid] = Room(room.id, room.backend, room.kind, room.free_bytes, 0)
        if load.wanted:
            waiting.add(load.key)
    return Plan(changes, decisions, waiting, blocked, claims)


def _least_useful(load: ModelLoad) -> str:
    """The copy to remove: the last one added (copies are listed in the order they were placed)."""
    return load.copies[-1]


def kept_copies(fleet: Fleet) -> dict[str, int]:
    """Copies a full rebalance keeps per model where that is not its `replicas`: the extra copies load
    brought (up to `max_replicas`) and a load-on-demand model's copies while resident. O(assignments)."""
    kept: dict[str, int] = {}
    models, containers = fleet.models, fleet.containers
    for key, ids in fleet.assignments.items():
        model = models.get(key)
        # Live copies are at most the assigned ones: most models are settled here without counting.
        if model is None or len(ids) <= model.replicas:
            continue
        live = sum(1 for cid in ids if cid in containers)
        if live > model.replicas:
            kept[key] = min(live, model.most_copies)
    return kept


def copies_to_place(fleet: Fleet, keys: Iterable[str]) -> dict[str, int]:
    """For the incremental placement: a wanted load-on-demand model needs one copy, a model with extra
    copies keeps them (never trimmed there: removals are the policy's)."""
    counts: dict[str, int] = {}
    for key in keys:
        model: ModelVersion | None = fleet.models.get(key)
        if model is None:
            continue
        live = sum(1 for cid in fleet.assignments.get(key, ()) if cid in fleet.containers)
        need = max(model.replicas, 1 if model.on_demand and (key in fleet.wanted or live) else 0)
        if need != model.replicas:
            counts[key] = need
    return counts


def resident_and_evictable(fleet: Fleet) -> tuple[int, int]:
    """(copies of models with replicas >= 1, copies of load-on-demand models) on live containers."""
    resident = evictable = 0
    for key, ids in fleet.assignments.items():
        model = fleet.models.get(key)
        if model is None:
            continue
        live = sum(1 for cid in ids if cid in fleet.containers)
        if model.on_demand:
            evictable += live
        else:
            resident += live
    return resident, evictable


def loads_of(
    fleet: Fleet,
    keys: Iterable[str],
    rates: Mapping[str, tuple[float, float]],
) -> list[ModelLoad]:
    """ModelLoads for `keys` from the fleet and the summed rates (key -> (calls/s, idle s))."""
    loads = []
    for key in sorted(set(keys)):
        model = fleet.models.get(key)
        if model is None:
            continue
        copies = tuple(cid for cid in fleet.assignments.get(key, ()) if cid in fleet.containers)
        ready = sum(
            1 for cid in copies if (s := fleet.states.get((cid, key))) is not None and s.phase == "ready"
        )
        rate, idle = rates.get(key, (0.0, math.inf))
        loads.append(
            ModelLoad(
                key=key,
                backend=model.backend,
                kind=model.kind,
                cost_bytes=fleet.budget_bytes(model),
                replicas=model.replicas,
                most_copies=model.most_copies,
                copies=copies,
                ready=ready,
                rate=rate,
                idle_s=idle,
                wanted=fleet.wanted.get(key) == "",
            )
        )
    return loads
