"""The embedded store: one SQLite file in a directory, safe across processes on one machine.

SQLite gives atomic writes and cross-process locking for free; revisions and a change log on top give
the same watch semantics as etcd, so every caller is written once against `Store`. Work runs in a thread
so the event loop never blocks on the file.
"""

from __future__ import annotations

import asyncio
import sqlite3
import threading
import time
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

from modelyard.placement.store.base import (
    MAX_TXN_OPS,
    CompactedError,
    Event,
    KeyValue,
    Lease,
    Store,
    StoreError,
)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS kv (key TEXT PRIMARY KEY, value BLOB NOT NULL, mod_revision INTEGER NOT NULL,
                               lease INTEGER);
CREATE TABLE IF NOT EXISTS log (revision INTEGER NOT NULL, key TEXT NOT NULL, value BLOB,
                                PRIMARY KEY (revision, key));
CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS leases (id INTEGER PRIMARY KEY AUTOINCREMENT, ttl_s REAL NOT NULL,
                                   expires_at REAL NOT NULL);
INSERT OR IGNORE INTO meta VALUES ('revision', 1), ('compacted', 0);
"""

STORE_FILE = "store.sqlite3"  # the one file of a store directory
# The change log keeps this many revisions for watchers that fall behind; older ones are compacted.
_LOG_KEEP_REVISIONS = 10_000
T = TypeVar("T")
_PREFIX_END = "\U0010ffff"
# Keys named in one `key IN (...)` query: under SQLite's smallest limit on bound parameters (999).
_KEYS_PER_QUERY = 500
# Keys one `put_absent` transaction creates. etcd caps a transaction's operations (MAX_TXN_OPS); SQLite does
# not, and each commit costs the same whatever its size: a bulk import of 100,000 versions, nothing else
# running, took 5.4 s in 100 transactions of 1,000 keys and 6.9 s in 1,000 of 100.
_ABSENT_PER_TXN = 1000


class _EmbeddedLease(Lease):
    def __init__(self, store: EmbeddedStore, lease_id: int, ttl_s: float) -> None:
        self.id = lease_id
        self.ttl_s = ttl_s
        self._store = store

    async def refresh(self) -> None:
        await self._store._run(self._store._refresh_lease, self.id, self.ttl_s)

    async def revoke(self) -> None:
        await self._store._run(self._store._revoke_lease, self.id)


# A safety net under `data_version`: an idle watch reads the log at least this often anyway.
WATCH_READ_AT_LEAST_EVERY_S = 5.0
# After inotify reports a write, data_version is looked at again after these waits (1.3 s in all).
SETTLE_CHECKS_S = (0.001, 0.005, 0.02, 0.05, 0.1, 0.2, 0.4, 0.5)


class _DirectoryWrites:
    """Sets `changed` whenever a file in a directory is written (inotify, read on the event loop)."""

    def __init__(self, notify: Any) -> None:
        self._notify = notify
        self.changed = asyncio.Event()
        self._loop = asyncio.get_running_loop()
        self._loop.add_reader(notify.fileno(), self._readable)

    @classmethod
    def open(cls, directory: Path) -> _DirectoryWrites | None:
        """None where inotify is not available (not Linux, or no watches left): the caller polls."""
        try:
            from inotify_simple import INotify, flags
        except ImportError:
            return None
        try:
            notify = INotify(nonblocking=True)
        except OSError:
            return None
        try:
            notify.add_watch(directory, flags.MODIFY | flags.CREATE | flags.MOVED_TO | flags.DELETE)
        except OSError:
            notify.close()
            return None
        return cls(notify)

    def _readable(self) -> None:
        self._notify.read(timeout=0)  # drain; which file does not matter
        self.changed.set()

    def close(self) -> None:
        self._loop.remove_reader(self._notify.fileno())
        self._notify.close()


class EmbeddedStore(Store):
    def __init__(self, directory: Path, *, poll_interval_s: float = 0.05) -> None:
        self.directory = directory
        self.poll_interval_s = poll_interval_s
        try:
            directory.mkdir(parents=True, exist_ok=True)
            self._conn = sqlite3.connect(
                directory / STORE_FILE, check_same_thread=False, isolation_level=None, timeout=10
            )
            self._set_up(directory)
        except (OSError, sqlite3.Error) as exc:
            raise StoreError(f"cannot open the embedded store in {directory}: {exc}") from exc
        self._lock = threading.Lock()

    def _set_up(self, directory: Path) -> None:
        """WAL mode and the schema. Two processes opening a new store at once can get "database is locked"
        here at once, without SQLite's busy timeout (switching to WAL takes an exclusive lock that SQLite
        does not wait for): it is tried again for up to 10 s, as a busy write would be."""
        deadline = time.monotonic() + 10.0
        while True:
            try:
                self._conn.execute("PRAGMA journal_mode=WAL")
                self._conn.execute("PRAGMA synchronous=NORMAL")
                self._conn.executescript(_SCHEMA)
                return
            except sqlite3.OperationalError as exc:
                if "locked" not in str(exc) or time.monotonic() > deadline:
                    raise
                time.sleep(0.05)

    def __repr__(self) -> str:
        return f"EmbeddedStore({str(self.directory)!r})"

    async def _run(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.to_thread(self._locked, fn, *args)

    def _locked(self, fn: Callable[..., T], *args: Any) -> T:
        with self._lock:
            try:
                return fn(*args)
            except sqlite3.Error as exc:
                raise StoreError(f"embedded store {self.directory}: {exc}") from exc

    # -- reads ---------------------------------------------------------------------------------------

    def _revision(self) -> int:
        return int(self._conn.execute("SELECT value FROM meta WHERE name='revision'").fetchone()[0])

    def _get(self, key: str) -> KeyValue | None:
        self._expire_leases()
        row = self._conn.execute("SELECT value, mod_revision FROM kv WHERE key=?", (key,)).fetchone()
        return KeyValue(key, bytes(row[0]), row[1]) if row else None

    def _get_prefix(self, prefix: str) -> tuple[list[KeyValue], int]:
        self._expire_leases()
        self._conn.execute("BEGIN")
        try:
            rows = self._conn.execute(
                "SELECT key, value, mod_revision FROM kv WHERE key >= ? AND key < ? ORDER BY key",
                (prefix, prefix + _PREFIX_END),
            ).fetchall()
            revision = self._revision()
        finally:
            self._conn.execute("COMMIT")
        return [KeyValue(k, bytes(v), r) for k, v, r in rows], revision

    def _get_range(self, start: str, end: str, limit: int) -> list[KeyValue]:
        self._expire_leases()
        rows = self._conn.execute(
            "SELECT key, value, mod_revision FROM kv WHERE key >= ? AND key < ? ORDER BY key LIMIT ?",
            (start, end, limit or -1),
        ).fetchall()
        return [KeyValue(k, bytes(v), r) for k, v, r in rows]

    async def get(self, key: str) -> KeyValue | None:
        return await self._run(self._get, key)

    async def get_range(self, start: str, end: str, limit: int = 0) -> list[KeyValue]:
        return await self._run(self._get_range, start, end, limit)

    async def get_prefix(self, prefix: str) -> tuple[list[KeyValue], int]:
        return await self._run(self._get_prefix, prefix)

    # -- writes --------------------------------------------------------------------------------------

    def _write(
        self,
        puts: Sequence[tuple[str, bytes]],
        deletes: Sequence[str],
        lease_id: int | None = None,
        if_equal: tuple[str, bytes | None] | None = None,
    ) -> int | None:
        """One atomic revision. Returns the revision, or None when `if_equal` did not hold."""
        conn = self._conn
        conn.execute("BEGIN IMMEDIATE")
        try:
            if if_equal is not None:
                row = conn.execute("SELECT value FROM kv WHERE key=?", (if_equal[0],)).fetchone()
                current = bytes(row[0]) if row else None
                if current != if_equal[1]:
                    conn.execute("ROLLBACK")
                    return None
            if (
                lease_id is not None
                and not conn.execute("SELECT 1 FROM leases WHERE id=?", (lease_id,)).fetchone()
            ):
                raise StoreError(f"lease {lease_id} has expired or was revoked")
            revision = self._revision() + 1
            for key, value in puts:
                conn.execute(
                    "INSERT INTO kv VALUES (?, ?, ?, ?) ON CONFLICT(key) DO UPDATE SET "
                    "value=excluded.value, mod_revision=excluded.mod_revision, lease=excluded.lease",
                    (key, value, revision, lease_id),
                )
                conn.execute("INSERT OR REPLACE INTO log VALUES (?, ?, ?)", (revision, key, value))
            for key in deletes:
                if conn.execute("DELETE FROM kv WHERE key=?", (key,)).rowcount:
                    conn.execute("INSERT OR REPLACE INTO log VALUES (?, ?, NULL)", (revision, key))
            conn.execute("UPDATE meta SET value=? WHERE name='revision'", (revision,))
            if revision % 1000 == 0:
                compacted = revision - _LOG_KEEP_REVISIONS
                conn.execute("DELETE FROM log WHERE revision <= ?", (compacted,))
                conn.execute("UPDATE meta SET value=max(value, ?) WHERE name='compacted'", (compacted,))
            conn.execute("COMMIT")
            return revision
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise

    def _expire_leases(self) -> None:
        now = time.time()
        if not self._conn.execute("SELECT 1 FROM leases WHERE expires_at < ? LIMIT 1", (now,)).fetchone():
            return
        expired = [r[0] for r in self._conn.execute("SELECT id FROM leases WHERE expires_at < ?", (now,))]
        for lease_id in expired:
            self._revoke_lease(lease_id)

    def _revoke_lease(self, lease_id: int) -> None:
        keys = [r[0] for r in self._conn.execute("SELECT key FROM kv WHERE lease=?", (lease_id,))]
        self._write([], keys)
        self._conn.execute("DELETE FROM leases WHERE id=?", (lease_id,))

    def _refresh_lease(self, lease_id: int, ttl_s: float) -> None:
        self._expire_leases()
        updated = self._conn.execute(
            "UPDATE leases SET expires_at=? WHERE id=?", (time.time() + ttl_s, lease_id)
        ).rowcount
        if not updated:
            raise StoreError(f"lease {lease_id} has expired or was revoked")

    def _grant_lease(self, ttl_s: float) -> int:
        cursor = self._conn.execute(
            "INSERT INTO leases (ttl_s, expires_at) VALUES (?, ?)", (ttl_s, time.time() + ttl_s)
        )
        return int(cursor.lastrowid or 0)

    async def put(self, key: str, value: bytes, *, lease: Lease | None = None) -> int:
        lease_id = lease.id if lease is not None else None
        revision = await self._run(self._write, [(key, value)], [], lease_id)
        assert revision is not None  # no condition given, so the write happened
        return revision

    async def delete(self, key: str) -> bool:
        def delete_one() -> bool:
            existed = self._conn.execute("SELECT 1 FROM kv WHERE key=?", (key,)).fetchone() is not None
            self._write([], [key])
            return existed

        return await self._run(delete_one)

    async def apply(
        self,
        puts: Mapping[str, bytes],
        deletes: Sequence[str] = (),
        *,
        if_equal: tuple[str, bytes | None] | None = None,
        lease: Lease | None = None,
    ) -> bool:
        # SQLite has no operation limit, but batching the same way as etcd keeps both stores' behaviour alike.
        ops: list[tuple[str, bytes | None]] = [*puts.items(), *((k, None) for k in deletes)]
        first = True
        for start in range(0, max(len(ops), 1), MAX_TXN_OPS):
            batch = ops[start : start + MAX_TXN_OPS]
            batch_puts = [(k, v) for k, v in batch if v is not None]
            batch_deletes = [k for k, v in batch if v is None]
            guard = if_equal if first else None
            lease_id = lease.id if lease is not None else None
            if await self._run(self._write, batch_puts, batch_deletes, lease_id, guard) is None:
                return False
            first = False
        return True

    def _put_absent(self, puts: Sequence[tuple[str, bytes]]) -> dict[str, bytes]:
        """One atomic revision creating the absent keys (each key once in `puts`); the present ones'
        values. The present keys are read in one query and the rest inserted in one `executemany`."""
        self._expire_leases()
        conn = self._conn
        conn.execute("BEGIN IMMEDIATE")
        try:
            keys = [key for key, _ in puts]
            present: dict[str, bytes] = {}
            for start in range(0, len(keys), _KEYS_PER_QUERY):
                part = keys[start : start + _KEYS_PER_QUERY]
                rows = conn.execute(
                    f"SELECT key, value FROM kv WHERE key IN ({','.join('?' * len(part))})", part
                )
                present.update((key, bytes(value)) for key, value in rows)
            revision = self._revision() + 1
            absent = [(key, value) for key, value in puts if key not in present]
            if absent:
                conn.executemany(
                    "INSERT INTO kv VALUES (?, ?, ?, NULL)", [(k, v, revision) for k, v in absent]
                )
                conn.executemany(
                    "INSERT OR REPLACE INTO log VALUES (?, ?, ?)", [(revision, k, v) for k, v in absent]
                )
                conn.execute("UPDATE meta SET value=? WHERE name='revision'", (revision,))
                if revision % 1000 == 0:  # as in _write: the change log keeps the last revisions only
                    compacted = revision - _LOG_KEEP_REVISIONS
                    conn.execute("DELETE FROM log WHERE revision <= ?", (compacted,))
                    conn.execute("UPDATE meta SET value=max(value, ?) WHERE name='compacted'", (compacted,))
            conn.execute("COMMIT")
            return present
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise

    async def put_absent(self, puts: Mapping[str, bytes]) -> dict[str, bytes]:
        items = list(puts.items())
        present: dict[str, bytes] = {}
        for start in range(0, len(items), _ABSENT_PER_TXN):
            present.update(await self._run(self._put_absent, items[start : start + _ABSENT_PER_TXN]))
        return present

    async def grant_lease(self, ttl_s: float) -> Lease:
        return _EmbeddedLease(self, await self._run(self._grant_lease, ttl_s), ttl_s)

    # -- watch ---------------------------------------------------------------------------------------

    def _changes_since(self, prefix: str, revision: int) -> list[Event]:
        self._expire_leases()
        compacted = int(self._conn.execute("SELECT value FROM meta WHERE name='compacted'").fetchone()[0])
        if revision <= compacted:
            raise CompactedError(f"revision {revision} was compacted (oldest kept: {compacted + 1})")
        rows = self._conn.execute(
            "SELECT revision, key, value FROM log WHERE revision >= ? AND key >= ? AND key < ? "
            "ORDER BY revision, key",
            (revision, prefix, prefix + _PREFIX_END),
        ).fetchall()
        return [
            Event("delete", key, b"", rev) if value is None else Event("put", key, bytes(value), rev)
            for rev, key, value in rows
        ]

    def _next_expiry(self) -> float:
        """When the earliest lease runs out (wall clock), or +inf without leases."""
        row = self._conn.execute("SELECT min(expires_at) FROM leases").fetchone()
        return float("inf") if row is None or row[0] is None else float(row[0])

    def _changes_and_next_expiry(self, prefix: str, revision: int) -> tuple[list[Event], float]:
        return self._changes_since(prefix, revision), self._next_expiry()

    async def watch_prefix(self, prefix: str, start_revision: int) -> AsyncIterator[list[Event]]:
        """Reads the log again only when something may have changed: a commit by any connection (SQLite's
        `data_version`, read on a connection of the watch's own, which never writes) or a lease running
        out (its deletions are written by whoever reads first), and at least every 5 s.

        On Linux it sleeps until the kernel says a file in the store's directory was written (inotify):
        an idle watch wakes only for those and for lease deadlines. Elsewhere it looks every
        `poll_interval_s`, with one cheap PRAGMA and no thread hop when nothing changed."""
        next_revision = start_revision
        probe = sqlite3.connect(self.directory / STORE_FILE, check_same_thread=False, timeout=0.05)
        written = _DirectoryWrites.open(self.directory)
        try:
            seen: int | None = None
            next_expiry = 0.0
            last_read = 0.0
            # Looks left after a write woke us and its commit was not visible yet (none until then).
            settling = len(SETTLE_CHECKS_S)
            while True:
                if written is not None:
                    written.changed.clear()  # before the look: a write after it wakes the next wait
                try:
                    version: int | None = int(probe.execute("PRAGMA data_version").fetchone()[0])
                except sqlite3.Error:
                    version = None  # cannot tell: read the log
                now = time.monotonic()
                if (
                    version is None
                    or version != seen
                    or time.time() >= next_expiry
                    or now - last_read >= WATCH_READ_AT_LEAST_EVERY_S
                ):
                    if version != seen:
                        settling = len(SETTLE_CHECKS_S)  # the commit that woke us is visible: no more looks
                    seen, last_read = version, now  # taken before the read: a commit during it is seen next
                    read = self._changes_and_next_expiry
                    events, next_expiry = await self._run(read, prefix, next_revision)
                    if events:
                        next_revision = events[-1].revision + 1
                        yield events
                        continue
                if written is None:
                    await asyncio.sleep(self.poll_interval_s)
                    continue
                if settling < len(SETTLE_CHECKS_S):
                    # A writer's WAL write woke us before its commit was published (in shared memory,
                    # which raises no inotify event): look again a few times before sleeping long.
                    wait_s = SETTLE_CHECKS_S[settling]
                    settling += 1
                else:
                    wait_s = min(WATCH_READ_AT_LEAST_EVERY_S, max(0.0, next_expiry - time.time()) + 0.01)
                try:
                    async with asyncio.timeout(wait_s):
                        await written.changed.wait()
                    settling = 0
                except TimeoutError:
                    pass
        finally:
            probe.close()
            if written is not None:
                written.close()

    async def close(self) -> None:
        with self._lock:
            self._conn.close()
