"""The store follower serves its event loop while a burst of events arrives, on both stores: etcd's client
hands a burst over an event at a time from a queue that never makes its reader wait."""

from __future__ import annotations

import asyncio
import itertools

from modelyard.placement import registry
from modelyard.placement.follow import SLICE_EVENTS, StoreFollower
from modelyard.placement.model import ModelVersion
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
