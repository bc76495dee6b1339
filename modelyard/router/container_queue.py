"""Fair sharing of a saturated container: calls over its concurrency bound wait in per-tenant queues.

Each container runs at most its bound of calls at once (its registration's `max_inflight`, else its
backend's default; each router takes its share, the bound divided among the live routers). A call that
finds its container at the bound waits in its tenant's queue; when a call on the container ends, the
slot goes straight to the next waiter by deficit round robin weighted by priority (router/fair_queue.py),
so a tenant with many callers gets no more of the container than a tenant with few.

Queues are bounded, and a wait never outlives its call: a call whose deadline cannot be met (by the wait
the queue ahead of it predicts, plus the container's running time) is refused at once with
RESOURCE_EXHAUSTED, and one whose deadline comes too close while waiting leaves the queue the same way —
never sent upstream to time out there.

The call path (routing.py) compares the container's calls in flight with its bound (one dict read); only
a call at the bound comes here.
"""

from __future__ import annotations

import asyncio
import math
import time
from dataclasses import dataclass, field

from modelyard.placement.registry import Changes, Fleet
from modelyard.placement.tenants import router_share
from modelyard.router.admission import ANONYMOUS, Overloaded
from modelyard.router.fair_queue import FairQueue, pops_before

MAX_QUEUED_PER_TENANT = 64  # calls of one tenant waiting for one container at this router
MAX_QUEUED = 1024  # calls waiting for one container at this router
SMOOTHING = 0.2  # weight of the newest interval in the running mean between slot hand-offs
RESERVE_S = 0.005  # a call leaves its queue at least this long before its deadline, to send its refusal


@dataclass
class _Waiter:
    future: asyncio.Future[None]


@dataclass
class _Gate:
    """One container's waiting calls at this router."""

    queue: FairQueue[_Waiter] = field(default_factory=FairQueue)
    last_end: float = 0.0  # when a call on the container last ended while calls waited


class ContainerQueues:
    def __init__(self, outstanding: dict[str, int], *, enabled: bool = True) -> None:
        """`outstanding`: calls in flight per container at this router (ContainerChannels.outstanding),
        shared: a slot handed to a waiter is counted there before the waiter runs."""
        self.enabled = enabled
        self.outstanding = outstanding
        self.bounds: dict[str, int] = {}  # container id -> this router's share of its bound
        self.waiting: dict[str, _Gate] = {}  # containers with calls waiting
        # container id -> running mean time between two of its calls ending while calls wait (its service
        # rate when saturated); kept between saturations
        self.interval_s: dict[str, float] = {}
        self._containers: dict[str, int] = {}  # container id -> its bound across routers
        self._routers = 1

    # -- following the store ---------------------------------------------------------------------------

    def on_change(self, fleet: Fleet, changes: Changes) -> None:
        if not (changes.everything or changes.containers or changes.tenants):
            return
        bounds = {cid: c.inflight_bound for cid, c in fleet.containers.items()}
        routers = max(1, len(fleet.routers))
        if bounds == self._containers and routers == self._routers:
            return
        self._containers, self._routers = bounds, routers
        self.interval_s = {cid: s for cid, s in self.interval_s.items() if cid in bounds}
        self.bounds = {cid: router_share(b, routers) for cid, b in bounds.items()} if self.enabled else {}
        for cid in list(self.waiting):  # a bound that grew (or a container that left) frees waiters
            while self.waiting.get(cid) is not None and self.outstanding.get(cid, 0) < self.bounds.get(
                cid, math.inf
            ):
                self._hand_off(cid, self.waiting[cid])

    def depth(self) -> dict[str, int]:
        """Calls waiting per container (the queue-depth metric)."""
        return {cid: len(gate.queue) for cid, gate in self.waiting.items()}

    # -- the call path ---------------------------------------------------------------------------------

    async def wait_turn(
        self, container_id: str, tenant: str | None, weight: int, time_left_s: float
    ) -> float:
        """Waits for a slot on a container at its bound, within `time_left_s` of the call's deadline;
        returns the seconds waited. The slot is counted in `outstanding` on return; raises Overloaded
        (nothing counted) when the queue is full or the deadline cannot be met."""
        name = tenant or ANONYMOUS
        gate = self.waiting.get(container_id)
        if gate is None:
            gate = self.waiting[container_id] = _Gate(last_end=time.monotonic())
        queue = gate.queue
        bound = self.bounds.get(container_id, 1)
        if queue.queued(name) >= MAX_QUEUED_PER_TENANT or len(queue) >= MAX_QUEUED:
            self._drop_if_idle(container_id, gate)
            raise Overloaded(
                f"container {container_id} is at its bound of {bound} calls in flight and "
                f"{'its queue' if len(queue) >= MAX_QUEUED else f'tenant {name!r}s queue'} for it is full",
                self._pushback_ms(container_id, len(queue)),
                limit="queue",
            )
        # What the wait will take: the calls served before this one, one slot hand-off each, then the
        # call's own run (about `bound` hand-offs: Little's law over the container's slots).
        interval_s = self.interval_s.get(container_id, 0.0)
        run_s = max(interval_s * bound, RESERVE_S)
        wait_s = interval_s * pops_before(queue.tenants(), name, weight)
        if time_left_s < wait_s + run_s:
            self._drop_if_idle(container_id, gate)
            raise Overloaded(
                f"container {container_id} is at its bound of {bound} calls in flight and this call's "
                f"deadline ({time_left_s * 1000:.0f} ms left) cannot be met: about "
                f"{(wait_s + run_s) * 1000:.0f} ms to wait and run",
                self._pushback_ms(container_id, len(queue)),
                limit="deadline",
            )
        waiter = _Waiter(asyncio.get_running_loop().create_future())
        queue.push(name, waiter, weight)
        started = time.monotonic()
        try:
            async with asyncio.timeout(max(0.0, time_left_s - run_s)):
                await waiter.future
        except TimeoutError:
            if not waiter.future.done() or waiter.future.cancelled():
                queue.remove(name, waiter)
                self._drop_if_idle(container_id, gate)
                raise Overloaded(
                    f"container {container_id} is at its bound of {bound} calls in flight and this call's "
                    f"deadline came too close while it waited ({(time.monotonic() - started) * 1000:.0f} ms)",
                    self._pushback_ms(container_id, len(queue)),
                    limit="deadline",
                ) from None
        except BaseException:  # cancelled (the caller went away): give back a slot handed over meanwhile
            if waiter.future.done() and not waiter.future.cancelled():
                self.outstanding[container_id] -= 1
                self.release(container_id)
            elif queue.remove(name, waiter):
                self._drop_if_idle(container_id, gate)
            raise
        return time.monotonic() - started

    def release(self, container_id: str) -> None:
        """A call on `container_id` ended (its count in `outstanding` already taken back): its slot goes to
        the next waiter, if any."""
        gate = self.waiting.get(container_id)
        if gate is None:
            return
        now = time.monotonic()
        between = now - gate.last_end
        gate.last_end = now
        mean = self.interval_s.get(container_id)
        self.interval_s[container_id] = between if mean is None else mean + (between - mean) * SMOOTHING
        if self.outstanding.get(container_id, 0) < self.bounds.get(container_id, math.inf):
            self._hand_off(container_id, gate)

    def _hand_off(self, container_id: str, gate: _Gate) -> None:
        while (popped := gate.queue.pop()) is not None:
            waiter = popped[1]
            if not waiter.future.done():
                self.outstanding[container_id] = self.outstanding.get(container_id, 0) + 1
                waiter.future.set_result(None)
                break
        self._drop_if_idle(container_id, gate)

    def _drop_if_idle(self, container_id: str, gate: _Gate) -> None:
        """A container with nobody waiting leaves `waiting`, so its calls take the fast path again."""
        if not gate.queue and self.waiting.get(container_id) is gate:
            del self.waiting[container_id]

    def _pushback_ms(self, container_id: str, queued: int) -> int:
        return max(1, math.ceil(self.interval_s.get(container_id, 0.0) * (queued + 1) * 1000))
