"""Store-backed placement: fleet usage for `show`, and rebalance plans applied make-before-break.

Planning stays pure (`plan_rebalance` takes a Fleet snapshot and returns a RebalancePlan); applying it
talks to the store: under a lease-held lock (so exactly one of two concurrent rebalances applies), it first
writes the union of the old and new maps so agents load every new copy, waits for those copies to be
ready, and only then writes the final map, which lets the agents drop the old copies.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass

from placement import registry
from placement.model import Container, ModelVersion
from placement.planner import Capacity, Demand, Plan, plan
from placement.registry import ConcurrentPlanError, Fleet
from placement.store import Store, StoreError

LOCK = registry.ROOT + "lock/rebalance"


class RebalanceInProgress(StoreError):
    """Another rebalance holds the lock."""


@dataclass(frozen=True)
class Move:
    """One copy changing place: `source` None is a new copy, `target` None a dropped one."""

    model: str
    source: str | None
    target: str | None
    memory_bytes: int


@dataclass(frozen=True)
class ContainerUsage:
    id: str
    kind: str
    capacity_bytes: int
    used_bytes: int
    copies: int
    live: bool

    @property
    def utilization(self) -> float:
        return self.used_bytes / self.capacity_bytes if self.capacity_bytes else 0.0


@dataclass(frozen=True)
class RebalancePlan:
    generation: int
    before: dict[str, tuple[str, ...]]
    after: dict[str, tuple[str, ...]]
    moves: list[Move]
    unplaced: dict[str, str]
    usage_before: list[ContainerUsage]
    usage_after: list[ContainerUsage]

    @property
    def bytes_moved(self) -> int:
        return sum(m.memory_bytes for m in self.moves if m.target is not None)


def budget_bytes(fleet: Fleet, model: ModelVersion) -> int:
    """What a copy costs: max(declared, measured), since declared sizes lie."""
    measured = [s.measured_bytes for (_, key), s in fleet.states.items() if key == model.key]
    return max([model.memory_bytes, *measured])


def usage(fleet: Fleet, assignments: dict[str, tuple[str, ...]]) -> list[ContainerUsage]:
    """Per container (live ones, and dead ones still holding copies): bytes used and copies."""
    used: dict[str, int] = {}
    copies: dict[str, int] = {}
    for key, ids in assignments.items():
        model = fleet.models.get(key)
        cost = budget_bytes(fleet, model) if model else 0
        for cid in ids:
            used[cid] = used.get(cid, 0) + cost
            copies[cid] = copies.get(cid, 0) + 1
    rows = [
        ContainerUsage(c.id, c.kind, c.memory_bytes, used.get(c.id, 0), copies.get(c.id, 0), True)
        for c in fleet.containers.values()
    ]
    rows += [
        ContainerUsage(cid, "?", 0, used[cid], copies[cid], False)
        for cid in used
        if cid not in fleet.containers
    ]
    return sorted(rows, key=lambda r: r.id)


def lost_copies(fleet: Fleet) -> list[tuple[str, str]]:
    """(model, container) for every assigned copy whose container's lease has expired."""
    return sorted(
        (key, cid) for key, ids in fleet.assignments.items() for cid in ids if cid not in fleet.containers
    )


def under_replicated(fleet: Fleet) -> dict[str, int]:
    """Registered models with fewer copies on live containers than their replicas: model -> live copies."""
    short = {}
    for key, model in fleet.models.items():
        live = sum(1 for cid in fleet.assignments.get(key, ()) if cid in fleet.containers)
        if live < model.replicas:
            short[key] = live
    return short


def _moves(fleet: Fleet, before: dict[str, tuple[str, ...]], after: dict[str, tuple[str, ...]]) -> list[Move]:
    moves = []
    for key in sorted(set(before) | set(after)):
        model = fleet.models.get(key)
        cost = budget_bytes(fleet, model) if model else 0
        old, new = set(before.get(key, ())), set(after.get(key, ()))
        gone, added = sorted(old - new), sorted(new - old)
        for i in range(max(len(gone), len(added))):
            moves.append(
                Move(key, gone[i] if i < len(gone) else None, added[i] if i < len(added) else None, cost)
            )
    return moves


def plan_fleet(
    models: Sequence[ModelVersion],
    containers: Sequence[Container],
    previous: Mapping[str, Sequence[str]],
    *,
    budgets: Mapping[str, int] | None = None,
    rebalance: bool = False,
) -> Plan:
    """Plans each backend separately: Triton models go to Triton containers, custom ones to ours."""
    assignments: dict[str, tuple[str, ...]] = {}
    unplaced: dict[str, str] = {}
    for backend in sorted({m.backend for m in models} | {c.backend for c in containers}):
        group = [m for m in models if m.backend == backend]
        if not group:
            continue
        result = plan(
            [Demand(m.key, (budgets or {}).get(m.key, m.memory_bytes), m.replicas, m.kind) for m in group],
            [Capacity(c.id, c.memory_bytes, c.kind) for c in containers if c.backend == backend],
            previous={m.key: previous[m.key] for m in group if m.key in previous},
            rebalance=rebalance,
        )
        assignments.update(result.assignments)
        unplaced.update({key: f"{why} (among {backend} containers)" for key, why in result.unplaced.items()})
    return Plan(assignments, unplaced)


def plan_rebalance(fleet: Fleet) -> RebalancePlan:
    """The map the registered models and live containers should have, sticky to the current one."""
    models = sorted(fleet.models.values(), key=lambda m: m.key)
    before = {k: ids for k, ids in fleet.assignments.items()}
    result = plan_fleet(
        models,
        list(fleet.containers.values()),
        before,
        budgets={m.key: budget_bytes(fleet, m) for m in models},
        rebalance=True,
    )
    after = dict(result.assignments)
    # A lost copy that could not be re-placed stays assigned: if its container comes back, so does the copy.
    for key, ids in before.items():
        model = fleet.models.get(key)
        if model is None:
            continue
        placed = after.get(key, ())
        lost = [cid for cid in ids if cid not in fleet.containers and cid not in placed]
        missing = model.replicas - len(placed)
        if missing > 0 and lost:
            after[key] = (*placed, *lost[:missing])
    return RebalancePlan(
        generation=fleet.generation,
        before=before,
        after=after,
        moves=_moves(fleet, before, after),
        unplaced=dict(result.unplaced),
        usage_before=usage(fleet, before),
        usage_after=usage(fleet, after),
    )


@contextlib.asynccontextmanager
async def rebalance_lock(store: Store, holder: str, ttl_s: float = 15.0) -> AsyncIterator[None]:
    """Held for the whole rebalance; expires with its lease if the holder dies."""
    lease = await store.grant_lease(ttl_s)
    if not await store.apply({LOCK: holder.encode()}, if_equal=(LOCK, None), lease=lease):
        await lease.revoke()
        current = await store.get(LOCK)
        owner = current.value.decode(errors="replace") if current else "unknown"
        raise RebalanceInProgress(
            f"another rebalance is in progress (held by {owner}); try again when it ends"
        )

    async def keep_alive() -> None:
        while True:
            await asyncio.sleep(ttl_s / 3)
            await lease.refresh()

    task = asyncio.create_task(keep_alive())
    try:
        yield
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        with contextlib.suppress(StoreError):
            await lease.revoke()


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
    ready_timeout_s: float = 300.0,
    poll_s: float = 0.2,
    on_ready: Callable[[Move], None] | None = None,
) -> ApplyResult:
    """Applies a plan make-before-break; copies that never became ready keep their old placement."""
    async with rebalance_lock(store, holder):
        if await registry.read_generation(store) != rebalance.generation:
            raise ConcurrentPlanError("the shard map changed since this plan was made; plan again")
        union = {
            key: tuple(dict.fromkeys((*rebalance.after.get(key, ()), *rebalance.before.get(key, ()))))
            for key in set(rebalance.before) | set(rebalance.after)
        }
        generation = await registry.write_shard_map(store, union, expected_generation=rebalance.generation)

        waiting = {(m.model, m.target): m for m in rebalance.moves if m.target is not None}
        failed: dict[tuple[str, str], str] = {}
        deadline = time.monotonic() + ready_timeout_s
        while waiting and time.monotonic() < deadline:
            fleet = await registry.load_fleet(store)
            for (key, cid), move in list(waiting.items()):
                state = fleet.states.get((cid, key))
                if state is not None and state.phase == "ready":
                    del waiting[(key, cid)]
                    if on_ready:
                        on_ready(move)
                elif cid not in fleet.containers:
                    failed[(key, cid)] = "container is gone"
                    del waiting[(key, cid)]
            if waiting:
                await asyncio.sleep(poll_s)
        for key, cid in waiting:
            failed[(key, cid)] = f"not ready within {ready_timeout_s:.0f} s"

        final = dict(rebalance.after)
        for key, cid in failed:
            # Keep the copies this model had; drop the one that never came up.
            kept = [c for c in final.get(key, ()) if c != cid] + list(rebalance.before.get(key, ()))
            final[key] = tuple(dict.fromkeys(kept))
            if not final[key]:
                del final[key]
        generation = await registry.write_shard_map(store, final, expected_generation=generation)
        return ApplyResult(generation, sum(1 for m in rebalance.moves if m.target) - len(failed), failed)
