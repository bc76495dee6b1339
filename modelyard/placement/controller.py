"""The placement controller: the one writer of the shard map, keeping it matched to the fleet.

It follows the store and, as one leader among any number of controllers (a key under its lease):
- places what is new at once and incrementally: a registered model without a copy, a model a router is
  waiting for (`wanted`), the copies of a container whose lease expired, the assignment of a removed model.
  An incremental pass costs O(the models it touches + copies), not a plan of the whole fleet;
- runs the full sticky rebalance (the one `modelyard placement rebalance` runs) when a container joins,
  when it becomes leader, and every `full_every_s`: new containers adopt copies, make-before-break.
Both write through one MapWriter under the rebalance lock, so a manual rebalance never applies at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import socket
import time
from collections.abc import Iterable, Mapping

from modelyard.placement import registry
from modelyard.placement.autoscale import Policy, copies_to_place, no_container_up
from modelyard.placement.autoscaler import Autoscaler
from modelyard.placement.follow import StoreFollower
from modelyard.placement.mapwriter import MapWriter
from modelyard.placement.model import ModelVersion
from modelyard.placement.planner import Capacity, Demand, plan
from modelyard.placement.rebalance import apply_rebalance, plan_rebalance, snapshot
from modelyard.placement.registry import Changes, Fleet
from modelyard.placement.store import Lease, Store, StoreError, StoreSpace
from modelyard.placement.store.base import MAX_TXN_OPS
from modelyard.placement.summary import SUMMARY, summarize
from modelyard.telemetry import Telemetry

log = logging.getLogger(__name__)

# Models one incremental pass places at most; more wait for the next pass. A pass's assignments become
# visible (and agents start loading them) only when its generation commits, and a pass of 60,000 models
# took ~40 s of staged writes on a busy store: the copies of a bulk import then arrived in two or three
# bursts while the containers idled between them. Passes of this size keep every agent loading.
INCREMENTAL_SLICE = 5_000


class PlacementController:
    def __init__(
        self,
        store: Store,
        *,
        debounce_s: float = 0.5,
        ready_timeout_s: float = 120.0,
        retry_s: float = 5.0,
        lease_ttl_s: float = 10.0,
        full_every_s: float = 300.0,
        eager: bool = True,
        follower: StoreFollower | None = None,
        copy_target_rps: float = 0.0,
        scale_down_after_s: float = 300.0,
        telemetry: Telemetry | None = None,
        summary_every_s: float = 5.0,
        space_every_s: float = 30.0,
        store_quota_bytes: int = 0,
    ) -> None:
        """`follower`: a store follower shared with other components of this process (else its own).
        `copy_target_rps`: calls/s per copy above which a model gets another copy (0: copies do not follow
        load); extra copies go after the rate stayed low for `scale_down_after_s` (placement/autoscale.py).
        `summary_every_s`: how often, at most, the leader writes the fleet summary (placement/summary.py)
        while the fleet changes; each write is one value of ~50 bytes per container. `space_every_s`: how
        often the leader reads the store's size (for the gauges next to `store_quota_bytes`, 0: unknown)."""
        self.store = store
        self.summary_every_s = summary_every_s
        self.space_every_s = space_every_s
        self.store_quota_bytes = store_quota_bytes
        self.space: StoreSpace | None = None  # as last read (by every controller, leading or not)
        self.telemetry = telemetry  # pass durations and placement failures (placement/metrics.py: gauges)
        self.debounce_s = debounce_s
        self.ready_timeout_s = ready_timeout_s
        self.retry_s = retry_s
        self.lease_ttl_s = lease_ttl_s
        self.full_every_s = full_every_s
        self.eager = eager  # place models when registered; else only when a call wants one (lazy load)
        self.holder = f"controller {socket.gethostname()}:{os.getpid()}:{id(self):x}"
        self.rounds = 0  # full rebalances that applied moves, for tests and metrics
        self.placements = 0  # incremental passes that wrote the map
        self.leading = asyncio.Event()
        self._owns_follower = follower is None
        self.follower = follower or StoreFollower(store, name="placement controller")
        self.writer = MapWriter(store, self.follower, self.holder)
        self._touched: set[str] = set()  # model keys an incremental pass should look at
        self._incremental = asyncio.Event()
        self._full = asyncio.Event()
        self.autoscaler = Autoscaler(
            self.writer,
            Policy(
                copy_target_rps=copy_target_rps,
                scale_down_after_s=scale_down_after_s,
                # Up fast but not on one burst: a third of the way down (Ray Serve: 30 s up, 600 s down).
                scale_up_after_s=min(30.0, scale_down_after_s / 3),
            ),
        )
        self.follower.listen(self._on_change)

    # -- following -------------------------------------------------------------------------------------

    def _on_change(self, fleet: Fleet, changes: Changes) -> None:
        if changes.everything:
            self._full.set()
            return
        touched = self._touched
        touched |= changes.registrations if self.eager else changes.registrations - fleet.models.keys()
        touched |= {key for key in changes.wanted if fleet.wanted.get(key) == ""}
        # A copy its container refused for lack of memory (507) moves to a container with room.
        touched |= {key for key in changes.models if key in fleet.full_copies}
        # Room freed by drained copies (evictions, fewer copies): place the models waiting for it.
        touched |= self.autoscaler.on_change(fleet, changes)
        # A wanted model that is ready (or gone) has its answer: the next pass removes the request.
        for key in changes.models:
            if fleet.wanted.get(key) == "" and (key not in fleet.models or _settled(fleet, key)):
                touched.add(key)
        for cid in changes.containers:
            if cid in fleet.containers:
                self._full.set()  # a container joined (or re-registered): it may adopt copies
            else:
                touched |= fleet.by_container.get(cid, set())  # its copies need a new home
        if touched:
            self._incremental.set()

    # -- leading ---------------------------------------------------------------------------------------

    async def run(self) -> None:
        self.follower.start()
        # Every controller, leading or not: on a full store no one can campaign (the leader key is a write).
        space = asyncio.create_task(self._space_loop(), name="controller-space")
        try:
            await self.follower.loaded.wait()
            while True:
                lease = await self._campaign()
                try:
                    await self._lead(lease)
                except StoreError as exc:
                    log.warning("placement controller: lost leadership (%s); campaigning again", exc)
                except Exception:
                    log.exception("placement controller: failed while leading; campaigning again")
                    await asyncio.sleep(self.retry_s)
                finally:
                    self.leading.clear()
                    with contextlib.suppress(StoreError, TimeoutError):
                        async with asyncio.timeout(5.0):
                            await lease.revoke()
        finally:
            space.cancel()
            await asyncio.gather(space, return_exceptions=True)
            if self._owns_follower:
                await self.follower.stop()

    async def _campaign(self) -> Lease:
        """Becomes the leader: a key under this controller's lease, written only if no one holds it."""
        while True:
            seen = self.follower.version
            if not self.follower.fleet.leader:
                try:
                    lease = await self.store.grant_lease(self.lease_ttl_s)
                    if await self.store.apply(
                        {registry.LEADER: self.holder.encode()}, if_equal=(registry.LEADER, None), lease=lease
                    ):
                        log.info("placement controller: %s leads", self.holder)
                        self.leading.set()
                        return lease
                    await lease.revoke()
                except StoreError as exc:
                    log.warning("placement controller: cannot campaign (%s); retrying", exc)
                    await asyncio.sleep(self.retry_s)
                    continue
            await self.follower.wait_changed(self.lease_ttl_s, seen)

    async def _lead(self, lease: Lease) -> None:
        self.writer.new_term()  # the first full pass fences out the previous leader (MapWriter.fence)
        self._full.set()
        tasks = [
            asyncio.create_task(self._keep_lease(lease), name="controller-lease"),
            asyncio.create_task(self._incremental_loop(), name="controller-incremental"),
            asyncio.create_task(self._full_loop(), name="controller-full"),
            asyncio.create_task(self.autoscaler.run(), name="controller-autoscale"),
            asyncio.create_task(self._summary_loop(), name="controller-summary"),
        ]
        try:
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
            for task in done:
                task.result()
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def _keep_lease(self, lease: Lease) -> None:
        while True:
            await asyncio.sleep(self.lease_ttl_s / 3)
            await lease.refresh()
            if self.follower.fleet.leader not in ("", self.holder) and self.follower.healthy:
                raise StoreError(f"the store names another leader ({self.follower.fleet.leader})")

    async def _summary_loop(self) -> None:
        """Writes the fleet summary `placement show` and `models list` read, when the fleet changed."""
        written = -1  # the follower version last summarized; -1: none yet (or the write failed)
        while True:
            seen = self.follower.version
            if seen != written:
                summary = summarize(self.follower.fleet, writer=self.holder, now=time.time())
                try:
                    await self.store.put(SUMMARY, summary.to_json())
                    written = seen
                except StoreError as exc:  # a summary is a convenience: never a reason to stop leading
                    log.info("placement controller: cannot write the fleet summary (%s)", exc)
            await asyncio.sleep(self.summary_every_s)
            await self.follower.wait_changed(None, written)

    async def _space_loop(self) -> None:
        """Reads how full the store is, for the gauges and the alert on a store near its quota."""
        while True:
            try:
                self.space = await self.store.space()
            except StoreError as exc:
                log.info("placement controller: cannot read the store's size (%s)", exc)
            await asyncio.sleep(self.space_every_s)

    # -- incremental -----------------------------------------------------------------------------------

    async def _incremental_loop(self) -> None:
        while True:
            await self._incremental.wait()
            await asyncio.sleep(0.01)  # gather a burst (concurrent cold calls, a bulk import's batch)
            self._incremental.clear()
            touched: set[str] = set()
            try:
                # The slice is chosen once the map is ours: with what is wanted by then, not before a wait.
                async with self.writer.locked():
                    touched = self._next_slice()
                    await self.place_incrementally(touched)
            except StoreError as exc:  # includes the lock held by a manual rebalance
                log.info("placement controller: %s; retrying in %.0f s", exc, self.retry_s)
                self._touched |= touched
                asyncio.get_running_loop().call_later(self.retry_s, self._incremental.set)
            except Exception:
                log.exception("placement controller: incremental placement failed; retrying")
                self._touched |= touched
                asyncio.get_running_loop().call_later(self.retry_s, self._incremental.set)

    def _next_slice(self) -> set[str]:
        """The models of the next incremental pass: every touched model, or INCREMENTAL_SLICE of them with
        the ones a router waits for (wanted) first, and another pass for the rest."""
        touched = self._touched
        if len(touched) <= INCREMENTAL_SLICE:
            self._touched = set()
            return touched
        wanted = self.follower.fleet.wanted
        first = [key for key in touched if key in wanted][:INCREMENTAL_SLICE]
        rest = (key for key in touched if key not in wanted)
        taken = {*first, *itertools.islice(rest, INCREMENTAL_SLICE - len(first))}
        self._touched = touched - taken
        self._incremental.set()
        return taken

    async def place_incrementally(self, keys: Iterable[str]) -> int:
        """Places the given models' missing copies around everything else; returns models changed."""
        keys = set(keys)
        async with self.writer.locked():
            started = time.monotonic()
            fleet = self.follower.fleet
            changes, unplaced = incremental_changes(
                fleet, keys, copies_to_place(fleet, keys), self.autoscaler.held_bytes()
            )
            if changes:
                await self.writer.update(changes)
                self.placements += 1
            # Answer routers waiting for a model: done (key deleted) or why not (the reason as value).
            fleet = self.follower.fleet
            asked = [k for k in keys if fleet.wanted.get(k) == ""]
            # A request stays until its model is ready or failed: agents load wanted models first.
            done = [registry.WANTED + k for k in asked if k not in fleet.models or _settled(fleet, k)]
            # Unless evicting load-on-demand copies can make room: the autoscaler tries that now.
            reasons = {
                registry.WANTED + k: unplaced[k].encode()
                for k in asked
                if k in unplaced and not self.autoscaler.may_make_room(k)
            }
            if any(k in unplaced for k in asked):
                self.autoscaler.wake({k: unplaced[k] for k in asked if k in unplaced})
            for start in range(0, len(done), MAX_TXN_OPS):
                await self.store.apply({}, done[start : start + MAX_TXN_OPS])
            if reasons:
                await self.store.apply(reasons)
            self._observe_pass("incremental", started, len(unplaced))
            if unplaced:
                sample = "; ".join(f"{k}: {why}" for k, why in sorted(unplaced.items())[:3])
                log.warning(
                    "placement controller: %d models cannot be placed, e.g. %s", len(unplaced), sample
                )
            return len(changes)

    # -- full rebalance --------------------------------------------------------------------------------

    async def _full_loop(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.full_every_s):
                    await self._full.wait()
            await asyncio.sleep(self.debounce_s)  # let a burst of joins settle into one plan
            self._full.clear()
            try:
                await self.reconcile()
            except StoreError as exc:  # includes a rebalance someone else holds, or a concurrent plan
                log.info("placement controller: %s; retrying in %.0f s", exc, self.retry_s)
                asyncio.get_running_loop().call_later(self.retry_s, self._full.set)

    async def reconcile(self) -> bool:
        """One full rebalance if the fleet needs one; True when it applied moves."""
        async with self.writer.locked():
            await self.writer.fence()
            started = time.monotonic()
            # Off the event loop: at 100k models a plan takes seconds, and under `modelyard up` this loop also
            # serves the router and the agents.
            proposal = await asyncio.to_thread(
                plan_rebalance, snapshot(self.follower.fleet), placed_only=not self.eager
            )
            log.debug("placement controller: planned in %.3f s", time.monotonic() - started)
            if not proposal.moves:
                self._observe_pass("full", started, 0)
                return False
            log.info("placement controller: applying %d moves", len(proposal.moves))
            result = await apply_rebalance(
                self.store,
                proposal,
                holder=self.holder,
                writer=self.writer,
                ready_timeout_s=self.ready_timeout_s,
            )
            self._observe_pass("full", started, len(result.failed))
        self.rounds += 1
        if result.failed:
            sample = ", ".join(
                f"{key} on {cid}: {why}" for (key, cid), why in sorted(result.failed.items())[:5]
            )
            log.warning(
                "placement controller: %d new copies did not become ready (old copies kept), e.g. %s",
                len(result.failed),
                sample,
            )
        return True

    def _observe_pass(self, kind: str, started: float, failures: int) -> None:
        if self.telemetry is not None and self.telemetry.metrics:
            self.telemetry.reconcile.record(time.monotonic() - started, {"pass": kind})
            if failures:
                self.telemetry.placement_failures.add(failures)


def _settled(fleet: Fleet, key: str) -> bool:
    """A model that has a ready copy, or whose every live copy failed to load."""
    live = [cid for cid in fleet.assignments.get(key, ()) if cid in fleet.containers]
    phases = [s.phase for cid in live if (s := fleet.states.get((cid, key))) is not None]
    return "ready" in phases or (bool(live) and len(phases) == len(live) and set(phases) == {"failed"})


def incremental_changes(
    fleet: Fleet,
    keys: Iterable[str],
    copies: Mapping[str, int] | None = None,
    held: Mapping[str, int] | None = None,
) -> tuple[dict[str, tuple[str, ...]], dict[str, str]]:
    """New assignments for `keys` only, placed into the room the rest of the map leaves.

    A removed model loses its assignment; a model short of live copies gets the missing ones on live
    containers of its backend (its live copies stay); copies on dead containers are dropped once the model
    has its replicas elsewhere, and kept (the container may come back) while it has not. A copy whose
    container refused it for lack of memory is dropped and placed again elsewhere, and that container
    counts as full (no free bytes) for this placement. `copies`: per model, the copies it needs when that
    is not its `replicas` (placement/autoscale.py copies_to_place); `held`: bytes per container still held
    by copies removed from the map and not unloaded yet. Pure.
    """
    changes: dict[str, tuple[str, ...]] = {}
    short: dict[str, ModelVersion] = {}
    for key in set(keys):
        assigned = fleet.assignments.get(key, ())
        model = fleet.models.get(key)
        if model is None:
            if assigned and registry.MODELS + key not in fleet.unparsable:  # unreadable is not removed
                changes[key] = ()
            continue
        refused = fleet.full_copies.get(key, set())
        live = tuple(cid for cid in assigned if cid in fleet.containers and cid not in refused)
        if len(live) < (copies or {}).get(key, model.replicas):
            short[model.key] = model
        elif live != assigned:
            changes[key] = live
    unplaced: dict[str, str] = {}
    if not short:
        return changes, unplaced
    need = {key: (copies or {}).get(key, model.replicas) for key, model in short.items()}
    # Free bytes per live container, not counting the copies of the models being placed (the planner
    # keeps those copies where they are and takes their bytes again).
    used = {cid: fleet.used.get(cid, 0) + (held or {}).get(cid, 0) for cid in fleet.containers}
    # A full container keeps room for the copies it holds of these models, and none for anything new.
    full = dict.fromkeys(fleet.full_containers(), 0)
    for key in short:
        for cid in fleet.assignments.get(key, ()):
            if cid in used:
                used[cid] -= fleet.cost.get(key, 0)
                if cid in full and cid not in fleet.full_copies.get(key, ()):
                    full[cid] += fleet.cost.get(key, 0)
    for backend in sorted({m.backend for m in short.values()}):
        group = [m for m in short.values() if m.backend == backend]
        capacities = [
            Capacity(c.id, full[c.id] if c.id in full else max(0, c.memory_bytes - used[c.id]), c.kind)
            for c in fleet.containers.values()
            if c.backend == backend
        ]
        previous = {
            m.key: [
                cid
                for cid in fleet.assignments.get(m.key, ())
                if cid in fleet.containers and cid not in fleet.full_copies.get(m.key, ())
            ]
            for m in group
        }
        result = plan(
            [Demand(m.key, fleet.budget_bytes(m), need[m.key], m.kind) for m in group],
            capacities,
            previous={k: v for k, v in previous.items() if v},
        )
        for m in group:
            placed = result.assignments.get(m.key, ())
            lost = [cid for cid in fleet.assignments.get(m.key, ()) if cid not in fleet.containers]
            missing = need[m.key] - len(placed)
            new = (*placed, *lost[: max(0, missing)])
            if new != fleet.assignments.get(m.key, ()):
                changes[m.key] = new
            if m.key in result.unplaced or not placed:
                if not capacities:  # not a matter of room: nothing of this backend is up to hold it
                    unplaced[m.key] = no_container_up(backend, "any")
                    continue
                why = result.unplaced.get(m.key, "no live container")
                unplaced[m.key] = f"{why} (among {backend} containers)"
    return changes, unplaced
