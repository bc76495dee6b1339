"""Per-tenant queues served in turn: deficit round robin, each tenant's quantum its weight. Pure: no I/O.

Used for calls waiting on a saturated container (router/container_queue.py): a tenant with many waiting
calls gets no more turns than a tenant with few, and over whole rounds tenants with waiting calls are
served in proportion to their weights (priority: high 4, normal 2, low 1). Every item costs one unit.

A tenant that had nothing queued goes first with its next item (as FQ-CoDel's new flows do): a sparse
tenant, one call now and then, waits for one slot instead of a round of the backlogged tenants' turns. It
gives up nothing: a tenant only gets there by having used less than its share.
"""

from __future__ import annotations

from collections import deque
from typing import Generic, TypeVar

T = TypeVar("T")


class FairQueue(Generic[T]):
    def __init__(self) -> None:
        self._queues: dict[str, deque[T]] = {}
        self._weights: dict[str, int] = {}
        self._deficit: dict[str, int] = {}
        self._turns: deque[str] = deque()  # tenants with items, in serving order; the first has the turn
        self._size = 0

    def __len__(self) -> int:
        return self._size

    def queued(self, tenant: str) -> int:
        queue = self._queues.get(tenant)
        return len(queue) if queue is not None else 0

    def tenants(self) -> dict[str, tuple[int, int]]:
        """Tenant -> (items queued, weight), for tenants with items."""
        return {t: (len(q), self._weights[t]) for t, q in self._queues.items()}

    def push(self, tenant: str, item: T, weight: int = 1) -> None:
        """Adds `item` at the end of `tenant`'s queue; `weight` (>= 1) applies from its next turn."""
        queue = self._queues.get(tenant)
        if queue is None:
            queue = self._queues[tenant] = deque()
            self._turns.appendleft(tenant)  # it had nothing queued: first (see above)
            self._deficit[tenant] = 0
        queue.append(item)
        self._weights[tenant] = max(1, weight)
        self._size += 1

    def pop(self) -> tuple[str, T] | None:
        """The next item by deficit round robin, with its tenant; None when empty."""
        if not self._turns:
            return None
        tenant = self._turns[0]
        queue = self._queues[tenant]
        if self._deficit[tenant] < 1:
            self._deficit[tenant] += self._weights[tenant]  # a new turn
        self._deficit[tenant] -= 1
        item = queue.popleft()
        self._size -= 1
        if not queue:
            self._forget(tenant)  # an emptied queue keeps no credit
            self._turns.popleft()
        elif self._deficit[tenant] < 1:
            self._turns.rotate(-1)  # turn over: to the back
        return tenant, item

    def remove(self, tenant: str, item: T) -> bool:
        """Takes `item` out of `tenant`'s queue (a caller that gave up); False if it is not there."""
        queue = self._queues.get(tenant)
        if queue is None:
            return False
        try:
            queue.remove(item)
        except ValueError:
            return False
        self._size -= 1
        if not queue:
            self._forget(tenant)
            self._turns.remove(tenant)
        return True

    def _forget(self, tenant: str) -> None:
        del self._queues[tenant]
        del self._weights[tenant]
        del self._deficit[tenant]


def pops_before(queues: dict[str, tuple[int, int]], tenant: str, weight: int) -> int:
    """About how many items leave before one pushed now for `tenant` (given `queues` as `tenants()` gives
    them): its own queue ahead of it, and what the others are served meanwhile in proportion to weights;
    none for a tenant with nothing queued (it goes first)."""
    if tenant not in queues:
        return 0
    own = queues[tenant][0] + 1
    ahead = own - 1
    for other, (queued, other_weight) in queues.items():
        if other != tenant:
            ahead += min(queued, -(-own * other_weight // max(1, weight)))
    return ahead
