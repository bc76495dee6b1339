"""The store interface: string keys, byte values, revisions, prefix watches and leases (etcd's model)."""

from __future__ import annotations

import abc
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    import asyncio


class StoreError(Exception):
    """A store operation failed; the message is meant for the user."""


class StoreUnavailable(StoreError):
    """The store cannot be reached."""


class StoreFull(StoreError):
    """The store refuses writes: etcd's database reached its space quota (its NOSPACE alarm is raised)."""


class CompactedError(StoreError):
    """A watch asked for history the store no longer keeps; reload the prefix and watch again."""


@dataclass(frozen=True, slots=True)
class KeyValue:
    key: str
    value: bytes
    mod_revision: int


@dataclass(frozen=True, slots=True)
class Event:
    kind: Literal["put", "delete"]
    key: str
    value: bytes  # empty for deletes
    revision: int


class Lease(abc.ABC):
    """A time-to-live grant: keys put with it vanish when it is revoked or not refreshed in time."""

    id: int
    ttl_s: float

    @abc.abstractmethod
    async def refresh(self) -> None: ...

    @abc.abstractmethod
    async def revoke(self) -> None: ...


async def stop_leased(task: asyncio.Task[None] | None, lease: Lease | None, timeout_s: float = 5.0) -> None:
    """Ends a loop that keeps keys under `lease` alive, then revokes the lease so its keys go at once (not
    when it runs out); a store that does not answer within `timeout_s` leaves that to the lease's TTL."""
    import asyncio  # here: the store's data model is imported by commands that must start fast
    import contextlib

    if task is not None:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    if lease is not None:
        with contextlib.suppress(StoreError, TimeoutError):
            async with asyncio.timeout(timeout_s):
                await lease.revoke()


@dataclass(frozen=True)
class StoreSpace:
    """How full the store is: its database's size (etcd's dbSize, as `etcdctl endpoint status` shows it)
    and whether it refuses writes for lack of space (etcd's NOSPACE alarm)."""

    db_bytes: int
    full: bool


# etcd's default --max-txn-ops is 128; stay below it so every batch is accepted.
MAX_TXN_OPS = 100


def prefix_end(prefix: str) -> str:
    """The first key after every key that starts with `prefix` (a range end, as etcd spells prefixes)."""
    return prefix[:-1] + chr(ord(prefix[-1]) + 1)


class Store(abc.ABC):
    """What placement, agents and routers need from etcd, implementable on one machine without it."""

    @abc.abstractmethod
    async def get(self, key: str) -> KeyValue | None: ...

    @abc.abstractmethod
    async def get_prefix(self, prefix: str) -> tuple[list[KeyValue], int]:
        """All keys under `prefix` in key order, and the store revision they were read at."""

    async def get_range(self, start: str, end: str, limit: int = 0) -> list[KeyValue]:
        """Keys from `start` (included) to `end` (excluded) in key order, at most `limit` (0: all): one page
        of a prefix without reading the rest of it. This generic version reads the whole common prefix; the
        stores read the page only."""
        common = 0
        while common < min(len(start), len(end)) and start[common] == end[common]:
            common += 1
        items, _ = await self.get_prefix(start[:common])
        page = [item for item in items if start <= item.key < end]
        return page[:limit] if limit else page

    async def space(self) -> StoreSpace | None:
        """The store's size and whether it is full; None where it has no space quota (the embedded store)."""
        return None

    @abc.abstractmethod
    async def put(self, key: str, value: bytes, *, lease: Lease | None = None) -> int:
        """Writes one key; returns the new revision."""

    @abc.abstractmethod
    async def delete(self, key: str) -> bool: ...

    @abc.abstractmethod
    async def apply(
        self,
        puts: Mapping[str, bytes],
        deletes: Sequence[str] = (),
        *,
        if_equal: tuple[str, bytes | None] | None = None,
        lease: Lease | None = None,
    ) -> bool:
        """Writes `puts` and `deletes` atomically if small enough, else in batches.

        With `if_equal=(key, value)` (value None: the key must be absent) the first batch applies only when
        the key holds that value; returns False, having written nothing, when it does not. With `lease`,
        the puts are attached to it.
        """

    async def put_absent(self, puts: Mapping[str, bytes]) -> dict[str, bytes]:
        """Creates each key of `puts` that is absent (a compare-and-swap per key); returns the value each
        present key holds instead (those keys are left as they are).

        Many keys go in batches of at most MAX_TXN_OPS, each batch one atomic write. This generic version
        writes one key at a time; the stores do it in one transaction per batch.
        """
        present: dict[str, bytes] = {}
        for key, value in puts.items():
            while not await self.apply({key: value}, if_equal=(key, None)):
                current = await self.get(key)
                if current is not None:
                    present[key] = current.value
                    break
        return present

    @abc.abstractmethod
    def watch_prefix(self, prefix: str, start_revision: int) -> AsyncIterator[list[Event]]:
        """Events under `prefix` from `start_revision` on, in batches; raises CompactedError if too old."""

    @abc.abstractmethod
    async def grant_lease(self, ttl_s: float) -> Lease: ...

    @abc.abstractmethod
    async def close(self) -> None: ...

    async def __aenter__(self) -> Store:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
