"""Keeps a RoutingTable current: one snapshot of the store, then its watch. Never blocks the request path.

If the store becomes unreachable the table keeps its last contents and `degraded` is set; when the store
comes back (or the watch's history was compacted) the table is reloaded from a fresh snapshot.
"""

from __future__ import annotations

import asyncio
import logging
import time

from placement import registry
from placement.store import CompactedError, Store, StoreError
from router.table import RoutingTable

log = logging.getLogger(__name__)


class TableFollower:
    def __init__(self, store: Store, table: RoutingTable, *, retry_s: float = 1.0) -> None:
        self.store = store
        self.table = table
        self.retry_s = retry_s
        self.degraded = False
        self.degraded_since: float | None = None  # monotonic time the store became unreachable
        self.first_load = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="routing-table-follower")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    async def _run(self) -> None:
        while True:
            try:
                fleet = await registry.load_fleet(self.store)
                self.table.replace(fleet)
                self.degraded = False
                self.degraded_since = None
                self.first_load.set()
                async for events in self.store.watch_prefix(registry.ROOT, fleet.revision + 1):
                    self.table.apply(events)
                # A watch that ends without an error is treated like a lost connection: reload.
            except CompactedError:
                log.info("routing table: watch history compacted; reloading")
                continue
            except StoreError as exc:
                if not self.degraded:
                    log.warning("routing table: store unreachable (%s); serving the last table", exc)
                    self.degraded_since = time.monotonic()
                self.degraded = True
            await asyncio.sleep(self.retry_s)
