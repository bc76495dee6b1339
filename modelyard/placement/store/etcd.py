"""The etcd store, through `aetcd` (asyncio, protobuf >= 4 compatible)."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from typing import Any, Literal, TypeVar, cast
from urllib.parse import unquote

import aetcd
import aetcd.exceptions
import aetcd.rpc
import aetcd.utils
import grpc
import grpc.aio

from modelyard.grpc_options import keepalive_options
from modelyard.placement.store import EtcdAccess
from modelyard.placement.store.base import (
    MAX_TXN_OPS,
    CompactedError,
    Event,
    KeyValue,
    Lease,
    Store,
    StoreError,
    StoreFull,
    StoreSpace,
    StoreUnavailable,
)

F = TypeVar("F", bound=Callable[..., Awaitable[Any]])
_MAX_RESPONSE_BYTES = 512 * 1024 * 1024
_PUT_ABSENT_CONCURRENCY = 4
PREFIX_PAGE_KEYS = 10_000  # keys per request of a prefix read (a few MiB)
_COMPACTED = "required revision has been compacted"  # etcd's answer to a read at a compacted revision
_UNREACHABLE = (aetcd.exceptions.ConnectionFailedError, aetcd.exceptions.ConnectionTimeoutError)
# etcd's answer to a write once its database reached --quota-backend-bytes (and from then on: the NOSPACE
# alarm stays raised, refusing every write, until an operator disarms it).
_NO_SPACE = ("database space exceeded", "NOSPACE")
# etcd weighs a transaction against its space quota by its top-level puts only: one made of nested
# transactions weighs nothing and is applied even past the quota, with the NOSPACE alarm raised (measured
# on etcd 3.4: 3,000 versions registered into a 1 MiB-quota store already refusing plain writes). So each
# put_absent batch also writes this key: the batch then counts, and a full store refuses it.
SPACE_GUARD = b"/modelyard/store/space-guard"


def store_full(endpoint: str) -> StoreFull:
    """The one line a refused write ends with: what happened, and what frees the space."""
    return StoreFull(
        f"etcd at {endpoint} refuses writes: its database reached its space quota "
        "(--quota-backend-bytes, NOSPACE alarm). Free space: compact old revisions (etcdctl compact "
        "REVISION), defragment each member (etcdctl defrag), then etcdctl alarm disarm; or raise the quota "
        "(docs/scaling-100k.md)"
    )


# With several endpoints, one attempt of a small request (a key, a transaction, a lease) may take this long
# before the next endpoint is tried: a request in flight when the etcd leader died is never answered (its
# proposal is lost), and the other members elect a new leader within about a second. A prefix read (a whole
# fleet) gets the client's full timeout.
ATTEMPT_S = 2.0
# etcd's words for "no leader right now": the request did not commit, or may not have; another try after
# the election is how etcd's own client handles them.
_LEADERLESS = ("leader changed", "no leader", "request timed out", "leader failure")
# How long a request answered "no leader" by every member keeps trying: an election after a leader died
# takes about one election timeout (1 s by default) plus a round of votes.
LEADERLESS_WAIT_S = 5.0


def _translated(fn: F) -> F:
    """Turns aetcd's errors into the store's, naming the endpoint, and tries each endpoint once.

    A member that refuses the connection (down, restarting) never got the request; one without a leader, or
    silent (cut off), did not apply it or may have: the request goes to the next endpoint at once, so one
    member gone or cut off costs a caller at most one attempt. Every request here is safe to send twice:
    puts write the same value again, and a compare-and-swap sent again answers False (changed meanwhile),
    which every caller already handles by reading again.
    """

    @functools.wraps(fn)
    async def wrapper(self: EtcdStore, *args: Any, **kwargs: Any) -> Any:
        # With one endpoint there is nowhere else to go: the client's own timeout applies.
        attempt_s = None if fn.__name__ == "get_prefix" or len(self.endpoints) == 1 else ATTEMPT_S
        tries = len(self.endpoints)
        electing_until: float | None = None  # set when every member said "no leader": wait out the election

        async def in_election(exc: Exception) -> bool:
            """Every member said "no leader": True (after a jittered pause) while an election may end."""
            nonlocal electing_until, tries
            if not any(words in str(exc) for words in _LEADERLESS):
                return False
            electing_until = electing_until or time.monotonic() + LEADERLESS_WAIT_S
            if time.monotonic() >= electing_until:
                return False
            await asyncio.sleep(0.1 + random.random() * 0.2)  # jittered: every client of the fleet retries
            tries = len(self.endpoints)
            return True

        while True:
            tries -= 1
            endpoint, client = self.endpoint, self._client
            try:
                async with asyncio.timeout(attempt_s):
                    return await fn(self, *args, **kwargs)
            except (*_UNREACHABLE, TimeoutError) as exc:
                await self._next_endpoint(client)
                if tries > 0 or await in_election(exc):
                    continue
                raise StoreUnavailable(f"etcd at {endpoint} is unreachable: {exc or 'timeout'}") from exc
            except asyncio.CancelledError:
                _raise_if_ours()
                raise StoreUnavailable(f"etcd at {endpoint}: the client moved to another endpoint") from None
            except aetcd.exceptions.RevisionCompactedError as exc:
                raise CompactedError(str(exc)) from exc
            except aetcd.exceptions.ClientError as exc:
                if any(sign in str(exc) for sign in _NO_SPACE):
                    raise store_full(endpoint) from exc
                if any(words in str(exc) for words in _LEADERLESS):
                    await self._next_endpoint(client)
                    if tries > 0 or await in_election(exc):
                        continue
                raise StoreError(f"etcd at {endpoint}: {exc}") from exc

    return cast(F, wrapper)


def _raise_if_ours() -> None:
    """Re-raises a CancelledError that cancels this task; one that does not comes from a call on a client
    closed under it (grpc.aio raises CancelledError in a call whose channel was closed)."""
    task = asyncio.current_task()
    if task is None or task.cancelling():
        raise asyncio.CancelledError


# etcd's require-leader flag (clientv3.WithRequireLeader): a member that has no leader (cut off from the
# others, or between leaders) refuses requests at once ("no leader") and ends its watches, instead of
# keeping a request waiting or a watch silent while the rest of the cluster moves on.
_REQUIRE_LEADER: tuple[tuple[str, str], ...] = (("hasleader", "true"),)


class _LeaderClient(aetcd.Client):
    """aetcd's client, with every request (watches included) carrying the require-leader flag."""

    def _init_channel_attrs(self) -> None:
        super()._init_channel_attrs()
        self.metadata = _REQUIRE_LEADER

    async def connect(self) -> None:
        await super().connect()
        if self.metadata is None or _REQUIRE_LEADER[0] not in self.metadata:  # replaced by an auth token
            self.metadata = (*(self.metadata or ()), *_REQUIRE_LEADER)
            if self._watcher is not None:
                self._watcher._metadata = self.metadata


def _credentials(access: EtcdAccess) -> grpc.ChannelCredentials | None:
    """TLS to etcd from its CA file (and, for client certificates, its certificate and key files)."""
    ca, cert, key = access.ca, access.cert, access.key
    if not (ca or cert or key):
        return None
    from modelyard.tls import TLSConfigError, channel_credentials

    try:
        return channel_credentials(ca, cert, key)
    except TLSConfigError as exc:
        raise StoreError(str(exc)) from exc


def _prefix_end(prefix: bytes) -> bytes:
    """etcd's range end for a prefix: the prefix with its last byte incremented."""
    trimmed = prefix.rstrip(b"\xff")
    return trimmed[:-1] + bytes([trimmed[-1] + 1]) if trimmed else b"\0"


class _EtcdLease(Lease):
    """A lease, refreshed and revoked through the store's current client: after the store moved to another
    endpoint (its member died or was cut off) the lease lives on there, rather than in a closed client that
    would dial the gone member again."""

    def __init__(self, store: EtcdStore, lease_id: int, ttl_s: float) -> None:
        self.id = lease_id
        self.ttl_s = ttl_s
        self._store = store

    async def refresh(self) -> None:
        response = await self._store._refresh_lease(self.id)
        if getattr(response, "TTL", 1) <= 0:
            raise StoreError(f"lease {self.id} has expired or was revoked")

    async def revoke(self) -> None:
        try:
            await self._store._revoke_lease(self.id)
        except StoreError as exc:
            if "not found" in str(exc):
                return  # expired or revoked already: what revoking wanted
            raise


class _TLSClient(_LeaderClient):
    """aetcd only opens plaintext channels; this one opens its channel with TLS credentials instead.

    aetcd builds the channel synchronously at the start of `connect()`, through the module-level
    `aetcd.rpc.insecure_channel`. A one-shot replacement installed right before and removed by its own
    first call hands back a TLS channel; as the event loop runs one coroutine at a time, no other client
    can pick it up.
    """

    def __init__(self, *args: Any, credentials: grpc.ChannelCredentials, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._credentials = credentials

    async def connect(self) -> None:
        plaintext = aetcd.rpc.insecure_channel

        def tls_channel(target: str, options: Any = None) -> grpc.aio.Channel:
            aetcd.rpc.insecure_channel = plaintext
            return grpc.aio.secure_channel(target, self._credentials, options=options)

        aetcd.rpc.insecure_channel = tls_channel
        try:
            await super().connect()
        finally:
            aetcd.rpc.insecure_channel = plaintext


class EtcdStore(Store):
    def __init__(
        self,
        endpoints: Sequence[tuple[str, int]],
        *,
        timeout_s: float = 5.0,
        username: str | None = None,
        password: str | None = None,
        credentials: grpc.ChannelCredentials | None = None,
    ) -> None:
        if not endpoints:
            raise StoreError("etcd store needs at least one host:port")
        self._username = username or None
        self._password = password or None
        self._credentials = credentials
        # aetcd talks to one endpoint at a time; after a call finds it unreachable, the next uses the next.
        self.endpoints = list(endpoints)
        self._index = 0
        self._timeout_s = timeout_s
        self._retiring: set[asyncio.Task[None]] = set()
        self._client = self._connect()

    @classmethod
    def from_url(cls, url: str, access: EtcdAccess | None = None) -> EtcdStore:
        """`etcd://[user:password@]host:port[,host:port...]`; `access`: the user and password when the URL
        names none, and the TLS files."""
        access = access or EtcdAccess()
        rest = url.removeprefix("etcd://").strip("/")
        username = password = None
        if "@" in rest:
            credentials, rest = rest.rsplit("@", 1)
            username, _, password = credentials.partition(":")
            username, password = unquote(username), unquote(password)
        endpoints: list[tuple[str, int]] = []
        for part in rest.split(","):
            host, sep, port = part.rpartition(":")
            if not sep or not host or not port.isdigit():
                raise StoreError(f"bad etcd endpoint {part!r} in {url!r}: expected host:port")
            endpoints.append((host, int(port)))
        return cls(
            endpoints,
            username=username or access.username,
            password=password or access.password,
            credentials=_credentials(access),
        )

    @property
    def endpoint(self) -> str:
        host, port = self.endpoints[self._index]
        return f"{host}:{port}"

    def __repr__(self) -> str:
        return f"EtcdStore({self.endpoint!r})"

    def _connect(self) -> aetcd.Client:
        host, port = self.endpoints[self._index]
        settings: dict[str, Any] = dict(
            host=host,
            port=port,
            username=self._username,
            password=self._password,
            timeout=int(self._timeout_s),
            connect_wait_timeout=1,
            options={
                # A whole prefix comes back in one response (aetcd has no paging): 100k assignments ~10 MiB.
                "grpc.max_receive_message_length": _MAX_RESPONSE_BYTES,
                # A member cut off without a reset leaves a watch silent: pings find out. etcd refuses pings
                # more often than every 5 s (--grpc-keepalive-min-time) with GOAWAY.
                **dict(keepalive_options(6000, 3000)),
            },
        )
        if self._credentials is not None:
            return _TLSClient(**settings, credentials=self._credentials)
        return _LeaderClient(**settings)

    async def _next_endpoint(self, failed: aetcd.Client) -> None:
        """Moves to the next endpoint after `failed` (the client a call failed on) did, once however many
        calls failed on it. Calls still in flight on it (a watch, other requests) end on their own errors
        or timeouts; it is closed under them only after the longest of those."""
        if len(self.endpoints) == 1 or failed is not self._client:
            return
        self._index = (self._index + 1) % len(self.endpoints)
        self._client = self._connect()
        task = asyncio.get_running_loop().create_task(self._retire(failed), name="etcd-client-retire")
        self._retiring.add(task)
        task.add_done_callback(self._retiring.discard)

    async def _retire(self, client: aetcd.Client) -> None:
        try:
            await asyncio.sleep(self._timeout_s)
        finally:
            with contextlib.suppress(Exception):
                await client.close()

    @_translated
    async def get(self, key: str) -> KeyValue | None:
        result = await self._client.get(key.encode())
        return KeyValue(key, result.value, result.mod_revision) if result is not None else None

    @_translated
    async def get_prefix(self, prefix: str) -> tuple[list[KeyValue], int]:
        while True:
            try:
                return await self._read_pages(prefix.encode(), aetcd.utils.prefix_range_end(prefix.encode()))
            except aetcd.exceptions.ClientError as exc:
                if _COMPACTED not in str(exc):
                    raise
                # compacted past the first page's revision during the read: read again, at the current one

    async def _read_pages(self, start: bytes, end: bytes) -> tuple[list[KeyValue], int]:
        """A range read in pages of PREFIX_PAGE_KEYS keys, every page at the revision of the first: one answer
        for a whole 100k-model fleet is ~100 MiB held at once in gRPC's buffer and its protobuf, memory the
        process then keeps (measured: a router holding a 100k fleet, 405 -> 325 MiB RSS)."""
        items: list[KeyValue] = []
        revision = 0  # the first page: the current one
        while True:
            request = aetcd.rpc.RangeRequest(
                key=start, range_end=end, limit=PREFIX_PAGE_KEYS, revision=revision
            )
            response = await self._rpc("kvstub", "Range", request)
            revision = revision or response.header.revision
            items.extend(KeyValue(kv.key.decode(), kv.value, kv.mod_revision) for kv in response.kvs)
            if not response.more or not response.kvs:
                return items, revision
            start = response.kvs[-1].key + b"\0"  # the next key after the page's last

    async def _rpc(self, stub: str, method: str, request: Any) -> Any:
        """One etcd RPC aetcd has no call for (`stub` names aetcd's attribute, set once connected), with
        aetcd's timeout, credentials and errors."""
        client = self._client
        await client.connect()
        try:
            call = getattr(getattr(client, stub), method)
            return await call(request, timeout=client._timeout, metadata=client.metadata)
        except aetcd.rpc.AioRpcError as exc:
            aetcd.exceptions._handle_exception(exc)  # raises aetcd's error for it, as its own calls do
            raise

    @_translated
    async def get_range(self, start: str, end: str, limit: int = 0) -> list[KeyValue]:
        request = aetcd.rpc.RangeRequest(key=start.encode(), range_end=end.encode(), limit=limit)
        response = await self._rpc("kvstub", "Range", request)
        return [KeyValue(kv.key.decode(), kv.value, kv.mod_revision) for kv in response.kvs]

    @_translated
    async def space(self) -> StoreSpace:
        """The answering member's database size and whether an alarm says it is out of space."""
        response = await self._rpc("maintenancestub", "Status", aetcd.rpc.StatusRequest())
        return StoreSpace(int(response.dbSize), any("NOSPACE" in error for error in response.errors))

    @_translated
    async def put(self, key: str, value: bytes, *, lease: Lease | None = None) -> int:
        result = await self._client.put(key.encode(), value, lease=lease.id if lease else None)
        return int(result.header.revision)

    @_translated
    async def delete(self, key: str) -> bool:
        return bool(await self._client.delete(key.encode()))

    @_translated
    async def apply(
        self,
        puts: Mapping[str, bytes],
        deletes: Sequence[str] = (),
        *,
        if_equal: tuple[str, bytes | None] | None = None,
        lease: Lease | None = None,
    ) -> bool:
        tx = self._client.transactions
        lease_id = lease.id if lease is not None else None
        ops = [tx.put(k.encode(), v, lease=lease_id) for k, v in puts.items()] + [
            tx.delete(k.encode()) for k in deletes
        ]
        first = True
        for start in range(0, max(len(ops), 1), MAX_TXN_OPS):
            compare = []
            if first and if_equal is not None:
                key, expected = if_equal
                compare = (
                    [tx.version(key.encode()) == 0]
                    if expected is None
                    else [tx.value(key.encode()) == expected]
                )
            succeeded, _ = await self._client.transaction(
                compare=compare, success=ops[start : start + MAX_TXN_OPS], failure=[]
            )
            if not succeeded:
                return False
            first = False
        return True

    @_translated
    async def put_absent(self, puts: Mapping[str, bytes]) -> dict[str, bytes]:
        # One transaction per batch holding a nested transaction per key (etcd >= 3.3): "if the key has
        # no version, put it, else read it" — every key decided in the same round trip.
        tx = self._client.transactions
        items = list(puts.items())
        batches = iter(range(0, len(items), MAX_TXN_OPS))
        present: dict[str, bytes] = {}

        async def write_batches() -> None:
            for start in batches:  # shared iterator: each batch is taken by one worker
                batch = items[start : start + MAX_TXN_OPS]
                ops = [
                    tx.txn(
                        compare=[tx.version(key.encode()) == 0],
                        success=[tx.put(key.encode(), value)],
                        failure=[tx.get(key.encode())],
                    )
                    for key, value in batch
                ]
                ops.append(tx.put(SPACE_GUARD, b""))
                _, responses = await self._client.transaction(compare=[], success=ops, failure=[])
                for (key, _), response in zip(batch, responses[: len(batch)], strict=True):
                    outcome = response.response_txn
                    if not outcome.succeeded:
                        kvs = outcome.responses[0].response_range.kvs
                        present[key] = kvs[0].value if kvs else b""

        # A few batches in flight hide the round trips; etcd applies each atomically in its own order.
        results = await asyncio.gather(
            *(write_batches() for _ in range(_PUT_ABSENT_CONCURRENCY)), return_exceptions=True
        )
        for result in results:
            if isinstance(result, BaseException):
                raise result
        return present

    async def watch_prefix(self, prefix: str, start_revision: int) -> AsyncIterator[list[Event]]:
        try:
            watch = await self._client.watch_prefix(prefix.encode(), start_revision=start_revision)
            async for event in watch:
                kind: Literal["put", "delete"] = (
                    "put" if event.kind == aetcd.rtypes.EventKind.PUT else "delete"
                )
                yield [Event(kind, event.kv.key.decode(), event.kv.value, event.kv.mod_revision)]
        except asyncio.CancelledError:
            _raise_if_ours()
            raise StoreUnavailable(
                f"etcd watch at {self.endpoint}: the client moved to another endpoint"
            ) from None
        except aetcd.exceptions.RevisionCompactedError as exc:
            raise CompactedError(str(exc)) from exc
        except _UNREACHABLE as exc:
            raise StoreUnavailable(f"etcd at {self.endpoint} is unreachable: {exc}") from exc
        except aetcd.exceptions.ClientError as exc:
            raise StoreError(f"etcd watch at {self.endpoint}: {exc}") from exc

    @_translated
    async def grant_lease(self, ttl_s: float) -> Lease:
        lease = await self._client.lease(max(1, round(ttl_s)))
        return _EtcdLease(self, lease.id, ttl_s)

    @_translated
    async def _refresh_lease(self, lease_id: int) -> Any:
        return await self._client.refresh_lease(lease_id)

    @_translated
    async def _revoke_lease(self, lease_id: int) -> None:
        await self._client.revoke_lease(lease_id)

    async def close(self) -> None:
        for task in list(self._retiring):
            task.cancel()
        await asyncio.gather(*self._retiring, return_exceptions=True)
        await self._client.close()
