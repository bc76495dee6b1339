"""The leading controller's side of copies-follow-load and memory-as-a-cache: reads the routers' rates,
runs the policy (placement/autoscale.py) every period and applies its decisions through the controller's
MapWriter (the staged map protocol), make-before-break:

- an added copy only joins the map: routers use it once its agent reports it ready;
- a removed or evicted copy leaves the map first (routers stop choosing it within a store event), then its
  agent drains it (`drain_s`) and unloads it. Its bytes count as used until its copy state is gone, so
  nothing is placed into memory that is still held; then the models waiting for that room are placed.

Decisions are logged and kept (the last 50, with counts of evictions and copy changes) under
`/modelyard/autoscale` for `modelyard placement show`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections import deque
from collections.abc import Iterable, Mapping

from modelyard.placement import registry
from modelyard.placement.autoscale import Plan, Policy, Room, Timers, loads_of, plan_autoscale
from modelyard.placement.mapwriter import MapWriter
from modelyard.placement.rates import ModelRate, read_rates
from modelyard.placement.registry import Changes, Fleet
from modelyard.placement.store import StoreError

log = logging.getLogger(__name__)

STATUS = registry.ROOT + "autoscale"  # the leader's last decisions and counters (JSON)
DRAIN_GIVE_UP_S = 120.0  # a removed copy whose state never goes (agent gone) stops holding room


class Autoscaler:
    def __init__(self, writer: MapWriter, policy: Policy, *, period_s: float | None = None):
        """`writer`: the controller's map writer (its store and follower are the ones it writes through)."""
        self.writer = writer
        self.policy = policy
        # Often enough to act well within a scale-down period, rarely enough to cost nothing.
        self.period_s = period_s or min(5.0, max(0.5, policy.scale_down_after_s / 6))
        self.timers = Timers()
        self.draining: dict[tuple[str, str], tuple[int, float]] = {}  # (container, model) -> bytes, since
        self.first_seen: dict[str, float] = {}  # model key -> when its first copy was seen (monotonic)
        self.last_call: dict[str, float] = {}  # model key -> its last call by any router (UNIX time)
        self.blocked: dict[str, str] = {}  # wanted models no eviction can make room for -> why
        # wanted model -> (container, bytes): draining room made (or found) for it, until it drained
        self.claims: dict[str, tuple[str, int]] = {}
        self.evictions = 0
        self.copy_changes = 0  # copies added or removed for load
        self.decisions: deque[str] = deque(maxlen=50)
        self._said: dict[str, str] = {}  # model -> its last "no room" line (logged once, not each pass)
        self._reasons: dict[str, str] = {}  # model -> why the incremental placement found no room
        self._wake = asyncio.Event()

    # -- what the controller's incremental placement asks --------------------------------------------------

    def held_bytes(self) -> dict[str, int]:
        """Bytes per container of copies removed from the map but not unloaded yet."""
        held: dict[str, int] = {}
        for (cid, _), (size, _) in self.draining.items():
            held[cid] = held.get(cid, 0) + size
        return held

    def may_make_room(self, key: str) -> bool:
        """False once a pass found that no eviction can ever make room for `key`."""
        return key not in self.blocked

    def wake(self, reasons: Mapping[str, str] | None = None) -> None:
        """A pass now; `reasons`: why the incremental placement found no room (said to the caller when
        no eviction can help either)."""
        self._reasons.update(reasons or {})
        self._wake.set()

    def on_change(self, fleet: Fleet, changes: Changes) -> set[str]:
        """Forgets drained copies; returns the wanted models to place again when room was freed."""
        if not self.draining:
            return set()
        now = time.monotonic()
        done = [
            (cid, key)
            for (cid, key), (_, since) in self.draining.items()
            if (
                (changes.everything or changes.containers or key in changes.models)
                and (
                    (cid, key) not in fleet.states
                    or cid not in fleet.containers
                    or cid in fleet.assignments.get(key, ())
                )
            )
            or now - since > DRAIN_GIVE_UP_S
        ]
        for pair in done:
            del self.draining[pair]
        if not done:
            return set()
        self._wake.set()
        return {key for key, why in fleet.wanted.items() if why == ""}

    # -- the loop ------------------------------------------------------------------------------------------

    async def run(self) -> None:
        wait_s = self.period_s
        while True:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(wait_s):
                    await self._wake.wait()
            self._wake.clear()
            wait_s = self.period_s
            try:
                plan = await self.tick()
            except StoreError as exc:  # the lock held by a manual rebalance, or the store down
                log.info("autoscaler: %s; next pass in %.1f s", exc, self.period_s)
                continue
            if plan.waiting:  # calls wait for copies to turn idle enough to evict: look again soon
                wait_s = min(self.period_s, max(0.1, self.policy.evict_idle_s / 8))

    async def tick(self) -> Plan:
        """One pass: rates, policy, map write, status."""
        wall = time.time()
        rates = await read_rates(self.writer.store, wall)
        writer = self.writer
        async with writer.locked():
            fleet = writer.follower.fleet
            now = time.monotonic()
            plan = plan_autoscale(
                loads_of(
                    fleet,
                    self._keys(fleet, rates) - self._claimed(fleet),
                    self._rates(fleet, rates, now, wall),
                ),
                self._rooms(fleet),
                self.policy,
                self.timers,
                now,
            )
            before = {key: fleet.assignments.get(key, ()) for key in plan.changes}
            if plan.changes:
                await writer.update(plan.changes)
        said = self._record(fleet, plan, before, now)
        await self._answer(plan, said)
        return plan

    def _keys(self, fleet: Fleet, rates: Iterable[str]) -> set[str]:
        """Models that matter to a pass: called, wanted, holding extra copies or resident on demand."""
        keys = {key for key in rates if key in fleet.models}
        keys |= {key for key, why in fleet.wanted.items() if why == ""}
        now = time.monotonic()
        seen = self.first_seen
        current: set[str] = set()
        for key, ids in fleet.assignments.items():
            model = fleet.models.get(key)
            if model is None or not ids:
                continue
            if model.on_demand or len(ids) > model.replicas:
                keys.add(key)
            if model.on_demand:
                current.add(key)
                seen.setdefault(key, now)
        for key in [k for k in seen if k not in current]:
            del seen[key]
        return keys

    def _rates(
        self, fleet: Fleet, rates: dict[str, ModelRate], now: float, wall: float
    ) -> dict[str, tuple[float, float]]:
        """(calls/s, idle s) of every model called while this controller led (reports hold only the last
        period's calls, so it keeps the last call of each); a copy placed moments ago counts as just used
        (its first call is on its way)."""
        last = self.last_call
        for key, rate in rates.items():
            if rate.idle_s != float("inf"):
                last[key] = max(last.get(key, 0.0), wall - rate.idle_s)
        if len(last) > 2 * len(fleet.models) + 1000:  # forget removed models now and then
            self.last_call = last = {k: t for k, t in last.items() if k in fleet.models}
        out: dict[str, tuple[float, float]] = {}
        for key, when in last.items():
            out[key] = (rates[key].rate if key in rates else 0.0, max(0.0, wall - when))
        for key, since in self.first_seen.items():
            calls, idle = out.get(key, (0.0, float("inf")))
            out[key] = (calls, min(idle, now - since))
        return out

    def _claimed(self, fleet: Fleet) -> set[str]:
        """Wanted models waiting for room made for them: left out of a pass while that room drains (a
        claim whose room has drained goes; the incremental pass placed the model, or it asks again)."""
        held = self.held_bytes()
        self.claims = {
            key: (cid, size)
            for key, (cid, size) in self.claims.items()
            if fleet.wanted.get(key) == "" and held.get(cid, 0) > 0
        }
        return set(self.claims)

    def _rooms(self, fleet: Fleet) -> list[Room]:
        held = self.held_bytes()
        claimed: dict[str, int] = {}
        for cid, size in self.claims.values():
            claimed[cid] = claimed.get(cid, 0) + size
        full = fleet.full_containers()
        return [
            Room(
                c.id,
                c.backend,
                c.kind,
                0 if c.id in full else max(0, c.memory_bytes - fleet.used.get(c.id, 0) - held.get(c.id, 0)),
                max(0, held.get(c.id, 0) - claimed.get(c.id, 0)),
            )
            for c in fleet.containers.values()
        ]

    def _record(self, fleet: Fleet, plan: Plan, before: dict[str, tuple[str, ...]], now: float) -> bool:
        """Notes removed copies as draining and logs the decisions; True when any was new."""
        said = False
        for key, ids in plan.changes.items():
            model = fleet.models.get(key)
            size = fleet.budget_bytes(model) if model is not None else 0
            for cid in set(before.get(key, ())) - set(ids):
                if (cid, key) not in fleet.states:
                    continue  # unloaded already (no drain): nothing holds room
                self.draining[(cid, key)] = (size, now)
        for decision in plan.decisions:
            line = decision.line()
            if decision.action == "no room":
                if self._said.get(decision.model) == line:
                    continue
                self._said[decision.model] = line
            elif decision.action == "evict":
                self.evictions += 1
            else:
                self.copy_changes += 1
                self._said.pop(decision.model, None)  # a later "no room" is news again
            log.info("autoscaler: %s", line)
            self.decisions.append(f"{time.strftime('%H:%M:%S')} {line}")
            said = True
        self.blocked = dict(plan.blocked)
        self.claims.update(plan.claims)
        return said

    async def _answer(self, plan: Plan, said: bool) -> None:
        """Fails the calls no eviction can serve (the reason into their wanted keys); publishes status."""
        store = self.writer.store
        fleet = self.writer.follower.fleet
        reasons = {
            registry.WANTED + key: self._reasons.pop(key, why).encode()
            for key, why in plan.blocked.items()
            if fleet.wanted.get(key) == ""
        }
        if reasons:
            await store.apply(reasons)
        self._reasons = {k: why for k, why in self._reasons.items() if fleet.wanted.get(k) == ""}
        if said:
            status = {
                "evictions": self.evictions,
                "copy_changes": self.copy_changes,
                "copy_target_rps": self.policy.copy_target_rps,
                "scale_down_after_s": self.policy.scale_down_after_s,
                "decisions": list(self.decisions),
            }
            await store.put(STATUS, json.dumps(status).encode())


def read_status(raw: bytes | None) -> dict[str, object]:
    """The status `placement show` prints; {} when absent or unreadable."""
    if not raw:
        return {}
    try:
        status = json.loads(raw.decode())
    except (ValueError, UnicodeDecodeError):
        return {}
    return status if isinstance(status, dict) else {}
