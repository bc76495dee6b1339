"""The one writer of the shard map: every map change goes through a MapWriter holding the rebalance lock.

The lock is a store key under the holder's lease, so exactly one process writes the map at a time and a
dead holder's lock goes with its lease. Within a process the lock is re-entrant: the placement controller
holds it across a make-before-break rebalance and still places a cold model meanwhile. Writes from one
process are serialized and always made against the writer's followed view of the store.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Mapping, Sequence

from modelyard.placement import registry
from modelyard.placement.follow import StoreFollower
from modelyard.placement.store import Lease, Store, StoreError

LOCK = registry.ROOT + "lock/rebalance"


class RebalanceInProgress(StoreError):
    """Another process holds the map writer's lock."""


class MapWriter:
    def __init__(
        self, store: Store, follower: StoreFollower, holder: str, *, lock_ttl_s: float = 15.0
    ) -> None:
        self.store = store
        self.follower = follower
        self.holder = holder
        self.lock_ttl_s = lock_ttl_s
        self.writes = 0  # generations written, for tests and metrics
        self.fenced = True  # a term starts unfenced (`new_term`)
        self._depth = 0
        self._entering = asyncio.Lock()
        self._writing = asyncio.Lock()
        self._lease: Lease | None = None
        self._keepalive: asyncio.Task[None] | None = None

    @contextlib.asynccontextmanager
    async def locked(self) -> AsyncIterator[MapWriter]:
        """Holds the store-wide lock for the block (re-entrant in this process)."""
        async with self._entering:
            if self._depth == 0:
                await self._acquire()
            self._depth += 1
        try:
            yield self
        finally:
            self._depth -= 1
            if self._depth == 0:
                await self._release()

    async def update(self, changes: Mapping[str, Sequence[str]], *, bump: bool = False) -> int:
        """Writes `changes` (model key -> container ids; empty: unassigned) as one new generation (with
        `bump`, even when nothing changes)."""
        assert self._depth > 0, "MapWriter.update outside locked()"
        async with self._writing:
            await self._caught_up()
            generation = await registry.update_shard_map(
                self.store, changes, base=self.follower.fleet, writer=self.holder, bump=bump
            )
            await self._caught_up(generation)
            self.writes += 1
            self.fenced = True
            return generation

    def new_term(self) -> None:
        """This writer starts a new term (a controller became leader): `fence` will write a generation."""
        self.fenced = False

    async def fence(self) -> None:
        """Commits a generation of this term's own unless this term wrote one already: a write the
        previous writer still has in flight (a deposed leader, cut off mid-write) compares against an
        older generation and fails, whatever else changes or not."""
        if not self.fenced:
            await self.update({}, bump=True)

    async def _caught_up(self, generation: int | None = None, timeout_s: float = 30.0) -> None:
        """Waits until the followed view shows the store's committed generation (or `generation`).

        Assignments of a generation are written before it is committed, so a view that has seen the commit
        has seen every assignment of it: writing against that view is writing against the store.
        """
        target = generation if generation is not None else await registry.read_generation(self.store)
        if target is None:  # garbage in the generation key: the write compares against it, as read
            return
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while True:
            seen = self.follower.version
            if self.follower.fleet.generation >= target:
                return
            left = deadline - loop.time()
            if left <= 0:
                raise StoreError(
                    f"the store view did not reach shard map generation {target} in {timeout_s:.0f} s"
                )
            await self.follower.wait_changed(left, seen)

    async def _acquire(self) -> None:
        lease = await self.store.grant_lease(self.lock_ttl_s)
        try:
            taken = await self.store.apply({LOCK: self.holder.encode()}, if_equal=(LOCK, None), lease=lease)
        except BaseException:
            # Cancelled (or failed) while the lock may have been written: revoking the lease removes it,
            # rather than leaving it to block every writer until the lease runs out.
            with contextlib.suppress(BaseException):
                await asyncio.shield(lease.revoke())
            raise
        if not taken:
            with contextlib.suppress(StoreError):
                await lease.revoke()
            current = await self.store.get(LOCK)
            owner = current.value.decode(errors="replace") if current else "unknown"
            raise RebalanceInProgress(
                f"another rebalance is in progress (held by {owner}); try again when it ends"
            )
        self._lease = lease
        self._keepalive = asyncio.create_task(self._keep_alive(lease), name="map-writer-lock")

    async def _keep_alive(self, lease: Lease) -> None:
        while True:
            await asyncio.sleep(self.lock_ttl_s / 3)
            await lease.refresh()

    async def _release(self) -> None:
        if self._keepalive is not None:
            self._keepalive.cancel()
            await asyncio.gather(self._keepalive, return_exceptions=True)
            self._keepalive = None
        lease, self._lease = self._lease, None
        if lease is not None:
            # Shielded: a stop that cancels us here must not leave the lock to expire on its own.
            with contextlib.suppress(StoreError):
                await asyncio.shield(lease.revoke())
