"""The store contract, run against both implementations: the embedded SQLite store and a real etcd."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from modelyard.placement.store import CompactedError, Event, Store, open_store
from modelyard.placement.store.base import MAX_TXN_OPS


def run(url: str, scenario) -> object:  # type: ignore[no-untyped-def]
    async def main() -> object:
        async with open_store(url) as store:
            return await scenario(store)

    return asyncio.run(main())


# Another process writing to a store: `python -c WRITER URL PREFIX N` puts PREFIX0 .. PREFIX{N-1}.
WRITER = (
    "import asyncio, sys\n"
    "from modelyard.placement.store import open_store\n"
    "async def main():\n"
    "    async with open_store(sys.argv[1]) as s:\n"
    "        for i in range(int(sys.argv[3])):\n"
    "            await s.put(f'{sys.argv[2]}{i}', b'x')\n"
    "asyncio.run(main())\n"
)


def first_read_signal(store: Store, monkeypatch: pytest.MonkeyPatch) -> asyncio.Event:
    """Set when the embedded store's watch first reads its log; `store.log_reads` counts the reads."""
    from modelyard.placement.store.embedded import EmbeddedStore

    assert isinstance(store, EmbeddedStore)
    loop = asyncio.get_running_loop()
    signal = asyncio.Event()
    real = store._changes_and_next_expiry
    store.log_reads = 0  # type: ignore[attr-defined]

    def counted(prefix: str, revision: int) -> tuple[list[Event], float]:  # runs in a thread
        store.log_reads += 1  # type: ignore[attr-defined]
        loop.call_soon_threadsafe(signal.set)
        return real(prefix, revision)

    monkeypatch.setattr(store, "_changes_and_next_expiry", counted)
    return signal


async def first_delete(store: Store, revision: int) -> Event:
    """The first delete a watch of /t/ from `revision` sees."""
    async for events in store.watch_prefix("/t/", revision):
        for event in events:
            if event.kind == "delete":
                return event
    raise AssertionError("watch ended")


def test_put_then_get_returns_value_and_revision(store_url: str) -> None:
    async def scenario(store: Store) -> None:
        first = await store.put("/t/a", b"one")
        second = await store.put("/t/a", b"two")
        item = await store.get("/t/a")
        assert item is not None and item.value == b"two"
        assert second > first and item.mod_revision == second
        assert await store.get("/t/missing") is None

    run(store_url, scenario)


def test_get_prefix_returns_only_the_prefix_in_key_order(store_url: str) -> None:
    async def scenario(store: Store) -> None:
        for key in ("/t/b", "/t/a", "/t/c/d", "/u/a", "/t"):
            await store.put(key, key.encode())
        items, revision = await store.get_prefix("/t/")
        assert [i.key for i in items] == ["/t/a", "/t/b", "/t/c/d"]
        assert all(i.value == i.key.encode() for i in items)
        assert revision >= max(i.mod_revision for i in items)

    run(store_url, scenario)


def test_delete_reports_whether_the_key_existed(store_url: str) -> None:
    async def scenario(store: Store) -> None:
        await store.put("/t/a", b"1")
        assert await store.delete("/t/a") is True
        assert await store.delete("/t/a") is False
        assert await store.get("/t/a") is None

    run(store_url, scenario)


def test_apply_with_guard_writes_nothing_when_the_guard_fails(store_url: str) -> None:
    async def scenario(store: Store) -> None:
        await store.put("/t/gen", b"3")
        assert not await store.apply({"/t/x": b"1"}, if_equal=("/t/gen", b"2"))
        assert await store.get("/t/x") is None
        assert not await store.apply({"/t/x": b"1"}, if_equal=("/t/gen", None))
        assert await store.apply({"/t/x": b"1", "/t/gen": b"4"}, if_equal=("/t/gen", b"3"))
        item = await store.get("/t/gen")
        assert item is not None and item.value == b"4"
        assert await store.apply({"/t/new": b"1"}, if_equal=("/t/absent", None))

    run(store_url, scenario)


def test_apply_beyond_one_transaction_writes_every_key(store_url: str) -> None:
    count = MAX_TXN_OPS * 3 + 7  # etcd rejects more than 128 operations per transaction

    async def scenario(store: Store) -> None:
        puts = {f"/t/{i:05d}": str(i).encode() for i in range(count)}
        assert await store.apply(puts)
        items, _ = await store.get_prefix("/t/")
        assert {i.key: i.value for i in items} == puts
        assert await store.apply({}, deletes=sorted(puts)[: MAX_TXN_OPS + 1])
        items, _ = await store.get_prefix("/t/")
        assert len(items) == count - MAX_TXN_OPS - 1

    run(store_url, scenario)


def test_watch_sees_puts_and_deletes_in_order_from_a_revision(store_url: str) -> None:
    async def scenario(store: Store) -> None:
        await store.put("/t/before", b"0")
        _, revision = await store.get_prefix("/t/")
        seen: list[Event] = []

        async def watch() -> None:
            async for events in store.watch_prefix("/t/", revision + 1):
                seen.extend(events)
                if len(seen) >= 3:
                    return

        task = asyncio.create_task(watch())
        await store.put("/t/a", b"1")
        await store.put("/other/x", b"ignored")
        await store.put("/t/a", b"2")
        await store.delete("/t/before")
        await asyncio.wait_for(task, timeout=10)
        assert [(e.kind, e.key, e.value) for e in seen] == [
            ("put", "/t/a", b"1"),
            ("put", "/t/a", b"2"),
            ("delete", "/t/before", b""),
        ]
        assert [e.revision for e in seen] == sorted(e.revision for e in seen)

    run(store_url, scenario)


def test_keys_under_an_expired_lease_disappear_and_watchers_see_it(store_url: str) -> None:
    async def scenario(store: Store) -> None:
        lease = await store.grant_lease(1)
        await store.put("/t/alive", b"1", lease=lease)
        _, revision = await store.get_prefix("/t/")
        assert await store.get("/t/alive") is not None

        event = await asyncio.wait_for(first_delete(store, revision + 1), timeout=15)
        assert event.key == "/t/alive"
        assert await store.get("/t/alive") is None

    run(store_url, scenario)


def test_refreshed_lease_keeps_its_keys(store_url: str) -> None:
    async def scenario(store: Store) -> None:
        lease = await store.grant_lease(1)
        await store.put("/t/alive", b"1", lease=lease)
        for _ in range(6):
            await asyncio.sleep(0.4)
            await lease.refresh()
        assert await store.get("/t/alive") is not None
        await lease.revoke()
        assert await store.get("/t/alive") is None

    run(store_url, scenario)


def test_embedded_watch_from_a_compacted_revision_raises(tmp_path) -> None:  # type: ignore[no-untyped-def]
    async def scenario(store: Store) -> None:
        with pytest.raises(CompactedError):
            async for _ in store.watch_prefix("/t/", 0):
                break

    run(str(tmp_path / "store"), scenario)


def test_embedded_store_is_shared_between_processes(tmp_path) -> None:  # type: ignore[no-untyped-def]
    import subprocess
    import sys

    url = str(tmp_path / "store")
    writers = [subprocess.Popen([sys.executable, "-c", WRITER, url, f"/t/{n}/", "50"]) for n in range(3)]
    assert [w.wait(60) for w in writers] == [0, 0, 0]

    async def scenario(store: Store) -> None:
        items, _ = await store.get_prefix("/t/")
        assert len(items) == 150
        assert len({i.mod_revision for i in items}) == 150  # every write got its own revision

    run(url, scenario)


def test_a_new_embedded_store_opened_by_many_processes_at_once_opens_in_all(tmp_path: Path) -> None:
    """Switching a new SQLite file to WAL takes a lock SQLite does not wait for: two CLI commands run at
    once on a fresh `./.modelyard/store` got "database is locked" (seen in CI) until opening retried."""
    import subprocess
    import sys

    code = (
        "import sys; from pathlib import Path; "
        "from modelyard.placement.store.embedded import EmbeddedStore; EmbeddedStore(Path(sys.argv[1]))"
    )
    for attempt in range(3):
        folder = tmp_path / f"store-{attempt}"
        processes = [
            subprocess.Popen([sys.executable, "-c", code, str(folder)], stderr=subprocess.PIPE, text=True)
            for _ in range(8)
        ]
        results = [(p.wait(timeout=60), p.stderr.read() if p.stderr else "") for p in processes]
        assert all(status == 0 for status, _ in results), [err for status, err in results if status]


@pytest.mark.parametrize("wakes_by", ["inotify", "polling"])
def test_embedded_watch_sees_another_process_s_write_by_data_version_alone(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, wakes_by: str
) -> None:
    """An idle embedded watch reads the log only when SQLite's data_version says a commit happened: with
    the periodic safety read switched off, a write from another process must still reach the watch,
    whether the watch sleeps until inotify reports a write (Linux) or polls (where inotify is missing)."""
    import sys

    from modelyard.placement.store import embedded

    monkeypatch.setattr(embedded, "WATCH_READ_AT_LEAST_EVERY_S", 1e9)
    if wakes_by == "polling":
        monkeypatch.setattr(embedded._DirectoryWrites, "open", classmethod(lambda cls, directory: None))
    url = str(tmp_path / "store")

    async def scenario(store: Store) -> None:
        _, revision = await store.get_prefix("/t/")
        first_look = first_read_signal(store, monkeypatch)

        async def first_put() -> Event:
            async for events in store.watch_prefix("/t/", revision + 1):
                return events[0]
            raise AssertionError("watch ended")

        watching = asyncio.create_task(first_put())
        await first_look.wait()  # the watch has read the log once and now only checks data_version
        writer = await asyncio.create_subprocess_exec(sys.executable, "-c", WRITER, url, "/t/elsewhere/", "1")
        assert await writer.wait() == 0
        event = await asyncio.wait_for(watching, timeout=30)
        assert (event.kind, event.key) == ("put", "/t/elsewhere/0")

    run(url, scenario)


def test_embedded_watch_sees_a_lease_expire_when_nobody_else_reads(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Nothing is written when a lease runs out; the watch itself must expire it when its time comes."""
    from modelyard.placement.store import embedded

    monkeypatch.setattr(embedded, "WATCH_READ_AT_LEAST_EVERY_S", 1e9)

    async def scenario(store: Store) -> None:
        lease = await store.grant_lease(1)
        await store.put("/t/alive", b"1", lease=lease)
        _, revision = await store.get_prefix("/t/")

        event = await asyncio.wait_for(first_delete(store, revision + 1), timeout=30)
        assert event.key == "/t/alive"

    run(str(tmp_path / "store"), scenario)


def test_an_idle_embedded_watch_does_not_read_the_log(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Idle is idle: with nothing written and no lease due, the watch neither reads the log nor hops to a
    thread; the first write after a quiet second is read at once (inotify wakes it)."""
    from modelyard.placement.store import embedded

    async def scenario(store: Store) -> None:
        assert isinstance(store, embedded.EmbeddedStore)
        first_read = first_read_signal(store, monkeypatch)
        _, revision = await store.get_prefix("/t/")
        got = asyncio.get_running_loop().create_future()

        async def watch() -> None:
            async for events in store.watch_prefix("/t/", revision + 1):
                got.set_result(events)
                return

        task = asyncio.create_task(watch())
        await first_read.wait()  # the watch's first look
        await asyncio.sleep(1.5)  # the idle period under test: 30 poll intervals of the polling fallback
        assert store.log_reads == 1  # type: ignore[attr-defined]
        await store.put("/t/a", b"1")
        events = await asyncio.wait_for(got, timeout=2)  # far below the 5-s safety read
        assert [e.key for e in events] == ["/t/a"]
        await task

    run(str(tmp_path / "store"), scenario)


def test_etcd_prefix_read_in_pages_is_one_revision(etcd_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A prefix read larger than a page comes in pages, all at the first page's revision: a write between
    two pages is not in it; a compaction past that revision during the read makes it read again."""
    from modelyard.placement.store import etcd

    monkeypatch.setattr(etcd, "PREFIX_PAGE_KEYS", 2)

    async def scenario(store: Store) -> None:
        assert isinstance(store, etcd.EtcdStore)
        for key in ("/t/a", "/t/b", "/t/c", "/t/d", "/t/e", "/u/a"):
            await store.put(key, key.encode())
        pages = 0
        real_rpc = store._rpc

        async def with_a_write_after_the_first_page(stub: str, method: str, request: object) -> object:
            nonlocal pages
            pages += 1
            response = await real_rpc(stub, method, request)
            if pages == 1:
                await store.put("/t/aa", b"after the first page")
            return response

        monkeypatch.setattr(store, "_rpc", with_a_write_after_the_first_page)
        items, revision = await store.get_prefix("/t/")
        assert [i.key for i in items] == ["/t/a", "/t/b", "/t/c", "/t/d", "/t/e"]
        assert all(i.value == i.key.encode() for i in items)
        assert pages == 3
        assert (await store.get("/t/aa")) is not None and revision < (await store.get("/t/aa")).mod_revision

        async def compacting_after_the_first_page(stub: str, method: str, request: object) -> object:
            nonlocal pages
            pages += 1
            response = await real_rpc(stub, method, request)
            if pages == 1:
                await store._client.compact(await store.put("/t/ab", b"compacted over"))
            return response

        pages = 0
        monkeypatch.setattr(store, "_rpc", compacting_after_the_first_page)
        items, _ = await store.get_prefix("/t/")
        assert [i.key for i in items] == ["/t/a", "/t/aa", "/t/ab", "/t/b", "/t/c", "/t/d", "/t/e"]
        assert pages == 2 + 4  # the first page, the second refused (compacted), then the whole read again

    run(etcd_url, scenario)
