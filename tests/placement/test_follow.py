"""The store follower serves its event loop while a burst of events arrives, on both stores: etcd's client
hands a burst over an event at a time from a queue that never makes its reader wait."""

from __future__ import annotations

import asyncio
import itertools

from modelyard.placement import registry
from modelyard.placement.follow import SLICE_EVENTS, StoreFollower
from modelyard.placement.model import Container, ModelVersion
from modelyard.placement.store import Store
from modelyard.placement.store.base import MAX_TXN_OPS
from tests.placement.test_store import run


def test_a_burst_of_registrations_is_applied_in_slices_with_the_loop_served_between(store_url: str) -> None:
    count = 4 * MAX_TXN_OPS

    async def scenario(store: Store) -> list[int]:
        follower = StoreFollower(store, name="test")
        follower.start()
        await follower.loaded.wait()
        seen: list[int] = []  # the models the follower knew, each time another task got the loop
        done = asyncio.Event()

        async def another_task() -> None:
            while not done.is_set():
                seen.append(len(follower.fleet.models))
                await asyncio.sleep(0)

        task = asyncio.create_task(another_task())
        try:
            models = [ModelVersion(f"m{i:05d}", "1", backend="custom", memory_bytes=4) for i in range(count)]
            await store.apply({registry.MODELS + m.key: m.to_json() for m in models})
            while True:
                version = follower.version
                if len(follower.fleet.models) >= count:
                    break
                assert await follower.wait_changed(30, version), "the follower stopped short of the burst"
        finally:
            done.set()
            await task
            await follower.stop()
        return seen

    seen = run(store_url, scenario)
    assert seen[-1] == count
    steps = [later - earlier for earlier, later in itertools.pairwise(seen) if later > earlier]
    # The loop went round at least once per slice: no task waited while more than a slice was applied.
    assert max(steps) <= SLICE_EVENTS, sorted(steps)[-5:]


def test_a_big_shard_map_commit_is_applied_in_slices_and_the_generation_moves_last(store_url: str) -> None:
    """A new generation that commits 2,000 staged assignments is not applied in one step of the loop: another
    task sees the assignments arrive in slices, and the generation (what writers wait for) only after all."""
    count = 2_000

    async def scenario(store: Store) -> tuple[list[tuple[int, int]], int]:
        models = [ModelVersion(f"m{i:05d}", "1", backend="custom", memory_bytes=4) for i in range(count)]
        container = Container("c0", "127.0.0.1:1", memory_bytes=1 << 30, backend="custom")
        await store.apply({registry.MODELS + m.key: m.to_json() for m in models})
        await store.apply({registry.CONTAINERS + container.id: container.to_json()})
        follower = StoreFollower(store, name="test")
        follower.start()
        await follower.loaded.wait()
        while len(follower.fleet.models) < count:
            assert await follower.wait_changed(30, follower.version), "the registrations never arrived"
        before = follower.fleet.generation
        seen: list[tuple[int, int]] = []  # (assigned models, generation), each time another task ran
        done = asyncio.Event()

        async def another_task() -> None:
            while not done.is_set():
                seen.append((len(follower.fleet.assignments), follower.fleet.generation))
                await asyncio.sleep(0)

        task = asyncio.create_task(another_task())
        try:
            # More than one transaction's worth: staged, then committed by one generation event.
            changes = {m.key: ("c0",) for m in models}
            committed = await registry.update_shard_map(store, changes, base=follower.fleet)
            while follower.fleet.generation != committed:
                assert await follower.wait_changed(30, follower.version), "the commit never arrived"
        finally:
            done.set()
            await task
            await follower.stop()
        return seen, before

    seen, before = run(store_url, scenario)
    assert seen[-1][0] == count
    steps = [later[0] - earlier[0] for earlier, later in itertools.pairwise(seen) if later[0] > earlier[0]]
    assert max(steps) <= count // 2, f"{max(steps)} of {count} assignments took effect in one step"
    # Part-way, the generation is still the previous one: a writer waiting for it waits for all of them.
    assert all(generation == before for assigned, generation in seen if 0 < assigned < count), seen
