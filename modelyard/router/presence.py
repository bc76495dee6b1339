"""A live router's key in the store, `/modelyard/routers/{router id}`, under a lease it keeps alive.

Routers count each other through these keys to take their share of fleet-wide limits (tenant limits,
container bounds). Keeping the lease alive writes no key, so no store watcher wakes while the fleet of
routers stays the same; a router that dies leaves the count within the lease's time to live.
"""

from __future__ import annotations

import asyncio
import logging

from modelyard.placement.registry import ROUTERS
from modelyard.placement.store import Lease, Store, StoreError, stop_leased

log = logging.getLogger(__name__)

# A dead router still counts for up to TTL_S (the others under-admit meanwhile); a longer refresh period
# keeps an idle router's store traffic down (a lease refresh wakes no etcd watcher, but it is a write).
TTL_S = 30.0
REFRESH_S = 10.0


class RouterPresence:
    def __init__(
        self, store: Store, router_id: str, *, ttl_s: float = TTL_S, refresh_s: float = REFRESH_S
    ) -> None:
        self.store = store
        self.key = ROUTERS + router_id
        self.ttl_s = ttl_s
        self.refresh_s = refresh_s
        self._lease: Lease | None = None
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="router-presence")

    async def stop(self) -> None:
        (task, self._task), (lease, self._lease) = (self._task, None), (self._lease, None)
        await stop_leased(task, lease)  # the key goes with it: the other routers take a larger share

    async def _run(self) -> None:
        while True:
            try:
                if self._lease is None:
                    self._lease = await self.store.grant_lease(self.ttl_s)
                    await self.store.put(self.key, b"1", lease=self._lease)
                else:
                    await self._lease.refresh()
            except StoreError as exc:  # store down or lease lapsed: announce again at the next try
                log.info("router presence: cannot keep %s (%s)", self.key, exc)
                self._lease = None
            await asyncio.sleep(self.refresh_s)
