"""Rebalancing: whole-fleet plans (`plan_fleet`, `plan_rebalance`), applied make-before-break.

Planning stays pure (`plan_rebalance` takes a Fleet snapshot and returns a RebalancePlan); applying it
talks to the store: under a lease-held lock (so exactly one of two concurrent rebalances applies), it first
writes the union of the old and new maps so agents load every new copy, waits for those copies to be
ready, and only then writes the final map, which lets the agents drop the old copies.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, replace

from modelyard.placement import registry
from modelyard.placement.autoscale import kept_copies
from modelyard.placement.follow import StoreFollower
from modelyard.placement.mapwriter import LOCK, MapWriter, RebalanceInProgress
from modelyard.placement.model import Container, ModelVersion
from modelyard.placement.planner import Capacity, Demands, Plan, plan
from modelyard.placement.registry import Changes, ConcurrentPlanError, Fleet
from modelyard.placement.store import Store

__all__ = ["LOCK", "RebalanceInProgress"]


@dataclass(frozen=True)
class Move:
    """One copy changing place: `source` None is a new copy, `target` None a dropped one."""

    model: str
    source: str | None
    target: str | None
    memory_bytes: int


@dataclass(frozen=True)
class RebalancePlan:
    generation: int
    before: dict[str, tuple[str, ...]]
    after: dict[str, tuple[str, ...]]
    moves: list[Move]
    unplaced: dict[str, str]
    # The models whose assignment changes: those with moves, and those whose copies are only reordered.
    changed: frozenset[str]

    @classmethod
    def between(
        cls,
        fleet: Fleet,
        before: dict[str, tuple[str, ...]],
        after: dict[str, tuple[str, ...]],
        unplaced: dict[str, str] | None = None,
    ) -> RebalancePlan:
        """The plan from `before` to `after` on `fleet`, its moves and changed models worked out."""
        # Found without sorting the whole map: a settled fleet changes few models.
        changed = [key for key, ids in after.items() if before.get(key, ()) != ids]
        changed += [key for key, ids in before.items() if ids and key not in after]
        moves = []
        for key in sorted(changed):
            model = fleet.models.get(key)
            cost = fleet.budget_bytes(model) if model else 0
            old, new = set(before.get(key, ())), set(after.get(key, ()))
            gone, added = sorted(old - new), sorted(new - old)
            for i in range(max(len(gone), len(added))):
                moves.append(
                    Move(key, gone[i] if i < len(gone) else None, added[i] if i < len(added) else None, cost)
                )
        return cls(fleet.generation, before, after, moves, unplaced or {}, frozenset(changed))

    @property
    def bytes_moved(self) -> int:
        return sum(m.memory_bytes for m in self.moves if m.target is not None)


# What planning needs of a model, one tuple per model: (key, backend, budget in bytes, copies, kind).
_Row = tuple[str, str, int, int, str]


def plan_fleet(
    models: Sequence[ModelVersion],
    containers: Sequence[Container],
    previous: Mapping[str, Sequence[str]],
    *,
    budgets: Mapping[str, int] | None = None,
    rebalance: bool = False,
    copies: Mapping[str, int] | None = None,
) -> Plan:
    """Plans each backend separately: Triton models go to Triton containers, custom ones to ours.

    `copies`: how many copies a model should have where that is not its `replicas` (placement/autoscale.py:
    extra copies under load, a load-on-demand model while resident); a model with none is left out."""
    rows = []
    for m in models:
        key = m.key
        budget = (budgets or {}).get(key, m.memory_bytes)
        rows.append((key, m.backend, budget, (copies or {}).get(key, m.replicas), m.kind))
    return _plan_rows(rows, containers, previous, rebalance=rebalance)


def _plan_rows(
    rows: Iterable[_Row],
    containers: Sequence[Container],
    previous: Mapping[str, Sequence[str]],
    *,
    rebalance: bool,
) -> Plan:
    """`plan_fleet` on rows: per backend, the models as the planner's columns (no object per model)."""
    columns: dict[str, tuple[list[str], list[int], list[int], list[str]]] = {}
    for key, backend, budget, copies, kind in rows:
        if copies <= 0:
            continue
        group = columns.get(backend)
        if group is None:
            group = columns[backend] = ([], [], [], [])
        group[0].append(key)
        group[1].append(budget)
        group[2].append(copies)
        group[3].append(kind)
    assignments: dict[str, tuple[str, ...]] = {}
    unplaced: dict[str, str] = {}
    used_bytes: dict[str, int] = {}
    for backend in sorted(columns):
        names, budgets, copies_of, kinds = columns[backend]
        # The planner looks `previous` up by the names it places: the other backends' keys are never read.
        result = plan(
            Demands(tuple(names), tuple(budgets), tuple(copies_of), tuple(kinds)),
            [Capacity(c.id, c.memory_bytes, c.kind) for c in containers if c.backend == backend],
            previous=previous,
            rebalance=rebalance,
        )
        assignments.update(result.assignments)
        unplaced.update({key: f"{why} (among {backend} containers)" for key, why in result.unplaced.items()})
        used_bytes.update(result.used_bytes)
    return Plan(assignments, unplaced, used_bytes)


def snapshot(fleet: Fleet) -> Fleet:
    """A copy of what planning reads, to plan in a thread while the followed fleet keeps changing."""
    copy = Fleet(
        models=dict(fleet.models),
        containers=dict(fleet.containers),
        assignments=dict(fleet.assignments),
        generation=fleet.generation,
        revision=fleet.revision,
    )
    copy.measured = dict(fleet.measured)
    copy.unparsable = set(fleet.unparsable)
    copy.full_copies = {key: set(cids) for key, cids in fleet.full_copies.items()}
    return copy


def _room_of_full_containers(
    fleet: Fleet, before: Mapping[str, tuple[str, ...]]
) -> tuple[list[Container], Mapping[str, tuple[str, ...]]]:
    """The live containers, a full one (it refused a load for lack of memory: SageMaker's 507) with room
    for exactly what it holds now, and the previous map without the copies such containers refused."""
    full = fleet.full_containers()
    if not full:
        return list(fleet.containers.values()), before
    previous = {
        key: tuple(cid for cid in ids if cid not in fleet.full_copies.get(key, ()))
        for key, ids in before.items()
    }
    held: dict[str, int] = {}
    for key, ids in previous.items():
        model = fleet.models.get(key)
        for cid in ids:
            if cid in full and model is not None:
                held[cid] = held.get(cid, 0) + fleet.budget_bytes(model)
    containers = [
        replace(c, memory_bytes=min(c.memory_bytes, held.get(c.id, 0))) if c.id in full else c
        for c in fleet.containers.values()
    ]
    return containers, previous


def plan_rebalance(
    fleet: Fleet, *, placed_only: bool = False, copies: Mapping[str, int] | None = None
) -> RebalancePlan:
    """The map the registered models and live containers should have, sticky to the current one.

    With `placed_only` (a controller that places on demand), models without a copy stay without one.
    `copies`: per model, the copies it should have when that is not its `replicas` (see `plan_fleet`).
    O(models + copies) around the planner itself, in one pass over the models: at 100k models every
    extra pass or object per model costs a noticeable part of a reconcile.
    """
    if copies is None:  # keep the extra copies load brought and resident load-on-demand copies
        copies = kept_copies(fleet)
    before = dict(fleet.assignments)
    containers, previous = _room_of_full_containers(fleet, before)
    measured = fleet.measured
    rows: list[_Row] = []
    for key, m in sorted(fleet.models.items()):
        if placed_only and key not in before:
            continue
        budget = m.memory_bytes
        for _, size in measured.get(key, ()):  # Fleet.budget_bytes, inline: a call per model costs
            if size > budget:
                budget = size
        rows.append((key, m.backend, budget, copies.get(key, m.replicas) if copies else m.replicas, m.kind))
    result = _plan_rows(rows, containers, previous, rebalance=True)
    after = dict(result.assignments)
    # A model whose registration does not parse is still registered: its copies stay where they are.
    for key, ids in before.items() if fleet.unparsable else ():
        if key not in fleet.models and registry.MODELS + key in fleet.unparsable:
            after[key] = ids
    # A lost copy that could not be re-placed stays assigned: if its container comes back, so does the copy.
    lost_somewhere = {cid for ids in before.values() for cid in ids} - fleet.containers.keys()
    for key, ids in before.items() if lost_somewhere else ():
        model = fleet.models.get(key)
        if model is None:
            continue
        placed = after.get(key, ())
        lost = [cid for cid in ids if cid not in fleet.containers and cid not in placed]
        missing = (copies or {}).get(key, model.replicas) - len(placed)
        if missing > 0 and lost:
            after[key] = (*placed, *lost[:missing])
    return RebalancePlan.between(fleet, before, after, dict(result.unplaced))


@dataclass(frozen=True)
class ApplyResult:
    generation: int
    ready: int  # new copies that became ready
    failed: dict[tuple[str, str], str]  # (model, container) -> why; the model's old copies were kept


async def apply_rebalance(
    store: Store,
    rebalance: RebalancePlan,
    *,
    holder: str,
    writer: MapWriter | None = None,
    ready_timeout_s: float = 300.0,
    on_ready: Callable[[Move], None] | None = None,
) -> ApplyResult:
    """Applies a plan make-before-break; copies that never became ready keep their old placement.

    Without `writer` (the CLI), a follower and a writer are made for this call.
    """
    if writer is not None:
        return await _apply(writer, rebalance, ready_timeout_s, on_ready)
    follower = StoreFollower(store, name="rebalance")
    follower.start()
    try:
        await follower.loaded.wait()
        writer = MapWriter(store, follower, holder)
        return await _apply(writer, rebalance, ready_timeout_s, on_ready)
    finally:
        await follower.stop()


async def _apply(
    writer: MapWriter,
    rebalance: RebalancePlan,
    ready_timeout_s: float,
    on_ready: Callable[[Move], None] | None,
) -> ApplyResult:
    follower = writer.follower
    async with writer.locked():
        stored = await registry.read_generation(writer.store)
        if stored is not None and stored != rebalance.generation:
            raise ConcurrentPlanError("the shard map changed since this plan was made; plan again")
        changed = rebalance.changed  # the rest of the map stays as it is: not written again
        union = {
            key: tuple(dict.fromkeys((*rebalance.after.get(key, ()), *rebalance.before.get(key, ()))))
            for key in changed
        }
        waiting: dict[str, dict[str, Move]] = {}  # model -> target container -> move
        for m in rebalance.moves:
            if m.target is not None:
                waiting.setdefault(m.model, {})[m.target] = m
        failed: dict[tuple[str, str], str] = {}

        def check(fleet: Fleet, keys: Iterable[str]) -> None:
            for key in keys:
                targets = waiting.get(key)
                if not targets:
                    continue
                for cid, move in list(targets.items()):
                    state = fleet.states.get((cid, key))
                    if cid not in fleet.containers:
                        failed[(key, cid)] = "container is gone"
                    elif state is not None and state.phase == "failed":
                        failed[(key, cid)] = (
                            f"load failed: {state.message}" if state.message else "load failed"
                        )
                    elif (
                        state is not None and state.phase == "ready" and cid in fleet.assignments.get(key, ())
                    ):
                        if on_ready:
                            on_ready(move)
                    else:
                        continue
                    del targets[cid]
                if not targets:
                    del waiting[key]

        def listener(fleet: Fleet, changes: Changes) -> None:
            if changes.everything or changes.containers:
                check(fleet, list(waiting))
            else:
                check(fleet, changes.models)

        follower.listen(listener)
        try:
            await writer.update({key: union[key] for key in changed})
            check(follower.fleet, list(waiting))
            loop = asyncio.get_running_loop()
            deadline = loop.time() + ready_timeout_s
            while waiting:
                seen = follower.version
                left = deadline - loop.time()
                if left <= 0 or not waiting:
                    break
                await follower.wait_changed(left, seen)
        finally:
            follower.unlisten(listener)
        for key, targets in waiting.items():
            for cid in targets:
                failed[(key, cid)] = f"not ready within {ready_timeout_s:.0f} s"

        final = dict(rebalance.after)
        for key, cid in failed:
            # Keep the copies this model had; drop the one that never came up.
            kept = [c for c in final.get(key, ()) if c != cid] + list(rebalance.before.get(key, ()))
            final[key] = tuple(dict.fromkeys(kept))
        # Only keys still as this rebalance left them: a cold model placed meanwhile stays placed.
        current = follower.fleet.assignments
        generation = await writer.update(
            {key: final.get(key, ()) for key in changed if current.get(key, ()) == union[key]}
        )
        return ApplyResult(generation, sum(1 for m in rebalance.moves if m.target) - len(failed), failed)
