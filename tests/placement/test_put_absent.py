"""`Store.put_absent`: create-if-absent for many keys at once, on the embedded store and a real etcd."""

from __future__ import annotations

import asyncio

from modelyard.placement.store import Store, open_store
from modelyard.placement.store.base import MAX_TXN_OPS


def run(url: str, scenario) -> object:  # type: ignore[no-untyped-def]
    async def main() -> object:
        async with open_store(url) as store:
            return await scenario(store)

    return asyncio.run(main())


def test_put_absent_creates_missing_keys_and_returns_present_ones_unchanged(store_url: str) -> None:
    # Several batches of each store (etcd's MAX_TXN_OPS, the embedded store's 1,000 keys and its queries of
    # 500), the last one partial; present keys on both sides of those boundaries.
    count = 2_517
    old = {f"/t/k{i:04d}": f"old-{i}".encode() for i in (3, 210, 499, 500, 999, 1000, 2516)}

    async def scenario(store: Store) -> None:
        for key, value in old.items():
            await store.put(key, value)
        present = await store.put_absent({f"/t/k{i:04d}": f"new-{i}".encode() for i in range(count)})
        assert present == old
        items, _ = await store.get_prefix("/t/")
        values = {item.key: item.value for item in items}
        assert len(values) == count
        assert all(values[key] == value for key, value in old.items())
        assert (
            values["/t/k0000"] == b"new-0" and values[f"/t/k{count - 2:04d}"] == f"new-{count - 2}".encode()
        )

    run(store_url, scenario)


def test_put_absent_writes_a_watchable_revision_per_batch(store_url: str) -> None:
    async def scenario(store: Store) -> None:
        _, start = await store.get_prefix("/t/")
        await store.put_absent({f"/t/k{i}": b"v" for i in range(MAX_TXN_OPS)})
        events = []
        async for batch in store.watch_prefix("/t/", start + 1):
            events.extend(batch)
            if len(events) >= MAX_TXN_OPS:
                break
        assert {e.key for e in events} == {f"/t/k{i}" for i in range(MAX_TXN_OPS)}
        assert len({e.revision for e in events}) == 1  # one atomic write

    run(store_url, scenario)


def test_racing_put_absent_calls_create_each_key_exactly_once(store_url: str) -> None:
    keys = [f"/t/k{i:04d}" for i in range(3 * MAX_TXN_OPS)]

    async def scenario(store: Store) -> None:
        writers = [f"writer-{w}".encode() for w in range(4)]
        results = await asyncio.gather(*(store.put_absent(dict.fromkeys(keys, w)) for w in writers))
        items, _ = await store.get_prefix("/t/")
        final = {item.key: item.value for item in items}
        assert set(final) == set(keys)
        for key in keys:
            # exactly one writer created it (it is absent from that writer's "present" answer), and
            # every other writer was told the winner's value
            creators = [w for w, present in zip(writers, results, strict=True) if key not in present]
            assert creators == [final[key]]
            assert all(present[key] == final[key] for present in results if key in present)

    run(store_url, scenario)


def test_the_generic_put_absent_of_the_interface_agrees_with_the_store_s_own(store_url: str) -> None:
    """`Store.put_absent` (one conditional write per key) is what a new store gets before it batches."""

    async def scenario(store: Store) -> None:
        await store.put("/t/b", b"old")
        present = await Store.put_absent(store, {"/t/a": b"1", "/t/b": b"2", "/t/c": b"3"})
        assert present == {"/t/b": b"old"}
        items, _ = await store.get_prefix("/t/")
        assert {i.key: i.value for i in items} == {"/t/a": b"1", "/t/b": b"old", "/t/c": b"3"}

    run(store_url, scenario)
