"""Shard maps larger than one transaction: seen whole or not at all, and never reverted by a stale writer."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence

import pytest

from modelyard.placement import registry
from modelyard.placement.registry import ConcurrentPlanError, Fleet
from modelyard.placement.store import Store, open_store
from modelyard.placement.store.base import MAX_TXN_OPS, Event, Lease


class PausingStore(Store):
    """The real store, except that the Nth conditional write waits until released.

    A writer that stops half-way through a staged map (it hung, or its process was killed) cannot be
    produced on demand with the real store alone: this pause is that fault, and nothing else is faked.
    """

    def __init__(self, inner: Store, pause_at: int) -> None:
        self.inner = inner
        self.pause_at = pause_at
        self.calls = 0
        self.paused = asyncio.Event()
        self.release = asyncio.Event()

    async def get(self, key: str):  # type: ignore[no-untyped-def]
        return await self.inner.get(key)

    async def get_prefix(self, prefix: str):  # type: ignore[no-untyped-def]
        return await self.inner.get_prefix(prefix)

    async def put(self, key: str, value: bytes, *, lease: Lease | None = None) -> int:
        return await self.inner.put(key, value, lease=lease)

    async def delete(self, key: str) -> bool:
        return await self.inner.delete(key)

    async def apply(
        self,
        puts: Mapping[str, bytes],
        deletes: Sequence[str] = (),
        *,
        if_equal: tuple[str, bytes | None] | None = None,
        lease: Lease | None = None,
    ) -> bool:
        self.calls += 1
        if self.calls == self.pause_at:
            self.paused.set()
            await self.release.wait()
        return await self.inner.apply(puts, deletes, if_equal=if_equal, lease=lease)

    def watch_prefix(self, prefix: str, start_revision: int):  # type: ignore[no-untyped-def]
        return self.inner.watch_prefix(prefix, start_revision)

    async def grant_lease(self, ttl_s: float) -> Lease:
        return await self.inner.grant_lease(ttl_s)

    async def close(self) -> None:
        await self.inner.close()


def run(url: str, scenario) -> object:  # type: ignore[no-untyped-def]
    async def main() -> object:
        async with open_store(url) as store:
            return await scenario(store)

    return asyncio.run(main())


COUNT = 5 * MAX_TXN_OPS  # several transactions' worth


def homogeneous(fleet: Fleet, keys: list[str]) -> set[tuple[str, ...]]:
    return {fleet.assignments.get(k, ()) for k in keys}


def test_a_map_larger_than_one_transaction_is_invisible_until_committed(store_url: str) -> None:
    async def scenario(store: Store) -> None:
        keys = [f"m{i}@1" for i in range(COUNT)]
        await registry.write_shard_map(store, {k: ["c1"] for k in keys}, expected_generation=0)
        follower_views: list[set[tuple[str, ...]]] = []
        watcher = await registry.load_fleet(store)
        committed = asyncio.Event()

        async def follow() -> None:
            async for events in store.watch_prefix(registry.ROOT, watcher.revision + 1):
                for event in events:
                    watcher.apply(event)
                follower_views.append(homogeneous(watcher, keys))
                if watcher.generation == 2:
                    committed.set()

        follow_task = asyncio.create_task(follow())
        pausing = PausingStore(store, pause_at=4)  # staging mark, two batches, then pause
        base = await registry.load_fleet(store)
        writer = asyncio.create_task(registry.update_shard_map(pausing, {k: ["c2"] for k in keys}, base=base))
        await asyncio.wait_for(pausing.paused.wait(), 10)
        # Half of the new map is in the store now; a fresh reader and a follower still see the old one.
        mid = await registry.load_fleet(store)
        assert mid.staging and mid.generation == 1
        assert homogeneous(mid, keys) == {("c1",)}
        raw_new = sum(1 for k in keys if mid.raw_assignments[k].ids == ("c2",))
        assert 0 < raw_new < COUNT  # the pause really is half-way
        pausing.release.set()
        assert await writer == 2
        done = await registry.load_fleet(store)
        assert homogeneous(done, keys) == {("c2",)} and not done.staging
        await asyncio.wait_for(committed.wait(), 10)
        follow_task.cancel()
        assert all(view in ({("c1",)}, {("c2",)}) for view in follower_views), follower_views

    run(store_url, scenario)


def test_a_writer_that_stopped_half_way_is_undone_and_can_never_write_again(store_url: str) -> None:
    async def scenario(store: Store) -> None:
        keys = [f"m{i}@1" for i in range(COUNT)]
        await registry.write_shard_map(store, {k: ["c1"] for k in keys}, expected_generation=0)
        pausing = PausingStore(store, pause_at=4)
        stale_base = await registry.load_fleet(store)
        stale = asyncio.create_task(
            registry.update_shard_map(pausing, {k: ["stale"] for k in keys}, base=stale_base)
        )
        await asyncio.wait_for(pausing.paused.wait(), 10)
        # The lock moved on: a new writer finds the half-staged map, undoes it and writes its own.
        base = await registry.load_fleet(store)
        assert base.staging
        generation = await registry.update_shard_map(store, {keys[0]: ["c3"]}, base=base)
        assert generation == 2
        pausing.release.set()
        with pytest.raises(ConcurrentPlanError):
            await stale
        fleet = await registry.load_fleet(store)
        assert fleet.generation == 2 and not fleet.staging
        assert fleet.assignments[keys[0]] == ("c3",)
        assert homogeneous(fleet, keys[1:]) == {("c1",)}  # nothing of the stale writer's map survives
        assert all(raw.ids != ("stale",) for raw in fleet.raw_assignments.values())

    run(store_url, scenario)


def test_unassigning_leaves_a_tombstone_that_a_later_write_removes(store_url: str) -> None:
    async def scenario(store: Store) -> None:
        await registry.write_shard_map(store, {"a@1": ["c1"], "b@1": ["c1"]}, expected_generation=0)
        await registry.write_shard_map(store, {"a@1": ["c1"]}, expected_generation=1)
        assert await store.get(registry.ASSIGN + "b@1") is not None  # the tombstone
        fleet = await registry.load_fleet(store)
        assert fleet.assignments == {"a@1": ("c1",)} and fleet.by_container == {"c1": {"a@1"}}
        await registry.write_shard_map(store, {"a@1": ["c2"]}, expected_generation=2)
        assert await store.get(registry.ASSIGN + "b@1") is None
        assert (await registry.load_fleet(store)).assignments == {"a@1": ("c2",)}

    run(store_url, scenario)


def test_garbage_in_the_generation_key_is_never_no_map(store_url: str) -> None:
    """A fresh reader of a store whose generation key holds garbage sees the map as written (not an empty
    one), a reader that read a good generation keeps it, and the next map write repairs the key."""

    async def scenario(store: Store) -> None:
        await registry.write_shard_map(store, {"a@1": ["c1"], "b@1": ["c2"]}, expected_generation=0)
        await registry.write_shard_map(store, {"a@1": ["c3"], "b@1": ["c2"]}, expected_generation=1)
        running = await registry.load_fleet(store)
        revision = await store.put(registry.GENERATION, b"\xffnot-a-generation")
        fresh = await registry.load_fleet(store)
        assert fresh.assignments == {"a@1": ("c3",), "b@1": ("c2",)} and fresh.generation == 2
        running.apply(Event("put", registry.GENERATION, b"\xffnot-a-generation", revision))
        assert running.assignments == fresh.assignments and running.generation == 2
        assert await registry.read_generation(store) is None
        assert await registry.update_shard_map(store, {"b@1": ["c4"]}, base=fresh) == 3
        repaired = await registry.load_fleet(store)
        assert repaired.assignments == {"a@1": ("c3",), "b@1": ("c4",)}
        assert repaired.unreadable_generation is None and await registry.read_generation(store) == 3

    run(store_url, scenario)


def test_a_new_terms_generation_fences_out_the_previous_writer(store_url: str) -> None:
    """A writer deposed with a write in flight (made against generation G) can never apply it once the new
    leader committed a generation of its own, even one that changes nothing; every write names its writer."""

    async def scenario(store: Store) -> None:
        await registry.write_shard_map(store, {"a@1": ["c1"]}, expected_generation=0)
        deposed_view = await registry.load_fleet(store)
        new_view = await registry.load_fleet(store)
        assert await registry.update_shard_map(store, {}, base=new_view, writer="new", bump=True) == 2
        with pytest.raises(ConcurrentPlanError):
            await registry.update_shard_map(store, {"a@1": ["c9"]}, base=deposed_view, writer="old")
        fleet = await registry.load_fleet(store)
        assert fleet.assignments == {"a@1": ("c1",)} and fleet.generation == 2
        writer = await store.get(registry.MAP_WRITER)
        assert writer is not None and writer.value == b"new"

    run(store_url, scenario)
