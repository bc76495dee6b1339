"""Streams over pooled, long-lived upstream streams: `InferStream`, `InferSession`, KServe `ModelStreamInfer`.

The router keeps `ModelStreamInfer` streams open to containers and reuses them for every client stream:
a request costs one message on a stream that is already open, not a new RPC. Upstream streams are pooled
per (container, model version), so one never carries two models: Triton writes responses of decoupled and
plain models through two paths that break its one-write-at-a-time rule and aborts (SIGABRT) when one
stream carries both. Many client streams share an upstream stream; the router gives each request a unique
id on the way up and puts the caller's id back on its responses (appended fields: tensors are never
decoded or copied apart from that one append). The router always asks for an explicit final response, so
it knows when each request ends; callers who did not ask for the empty one do not get it.

Flow control: a client stream has at most MAX_STREAM_REQUESTS requests in flight (then the router stops
reading its requests and gRPC holds the client back). The reader of a shared upstream stream never waits
for one caller — that would hold up every other caller on the stream — so each client stream's responses
wait in its own sink, up to SINK_LIMIT_BYTES; a caller that lets more pile up (it stopped reading) gets
RESOURCE_EXHAUSTED and its requests are abandoned. A Triton stream takes up to REQUESTS_PER_UPSTREAM
requests at once; other containers serve a stream's requests one after another, so theirs take one.

Cancellation: a client stream that goes away (or a request past its deadline) abandons its requests; the
upstream stream that carries them takes no new requests and is cancelled — stopping the container's work —
as soon as no other caller's request is left on it, never before. An upstream stream that fails
(UNAVAILABLE: the container died or closed it) moves each request it carries that has had no response yet
to another ready copy, or waits for the copy that replaces it within the request's deadline, as a unary
call does; so does a request the container answers "model not found/not ready" before any response (a
stale copy). A request that has had a response is never resent (the caller saw part of its answer): it
fails with the stream's status.

A request that cannot be routed gets an in-stream error response on the bidi fronts, as Triton answers a
bad request in a stream, and the stream goes on; `InferStream` (one request) ends with the error's status.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections import deque
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

import grpc
import grpc.aio

from modelyard.errors import ModelyardError
from modelyard.fleet_secret import FLEET_SECRET_HEADER
from modelyard.placement.model import PER_VERSION_NAME_BACKENDS, Container, ModelVersion
from modelyard.router.errors import (
    ContainerStreamError,
    UpstreamFailed,
    stream_error_code,
)
from modelyard.router.forward import ContainerChannels
from modelyard.router.public_names import public_error
from modelyard.router.sagemaker_forward import reject_stream
from modelyard.router.sequences import lost_sequence, read_sequence, sticky_copy
from modelyard.router.wire import (
    StreamResponse,
    WireError,
    nested,
    read_header,
    response_fields,
    stream_error,
    wants_empty_final_response,
    with_stream_request_id,
)

if TYPE_CHECKING:
    from modelyard.router.routing import Router


def _public_error(request: _Request, message: str) -> str:
    """A container's in-stream error as the request's caller should read it (routing.public_error)."""
    return public_error(request.model, message, request.upstream_id, request.caller_id)


def _caller_error(request: _Request, container_id: str, message: str) -> str:
    """An in-stream error delivered to the caller: public names, and for a call of a Triton sequence whose
    copy no longer holds it, the lost sequence named (as a unary call's; router/sequences.py)."""
    sequence = read_sequence(request.data)
    if sequence is not None:
        lost = lost_sequence(sequence, request.model, container_id, stream_error_code(message), message)
        if lost is not None:
            return lost.details
    return _public_error(request, message)


log = logging.getLogger(__name__)

STREAM_METHOD = "/inference.GRPCInferenceService/ModelStreamInfer"
REQUESTS_PER_UPSTREAM = 64  # requests in flight on one Triton stream before the pool opens another
SINK_LIMIT_BYTES = 8 * 2**20  # responses one client stream may leave unread before it is failed
MAX_STREAM_REQUESTS = 64  # requests one client stream may have in flight
IDLE_CLOSE_S = 60.0  # an upstream stream with nothing in flight for this long is closed


# Codes after which a request that has had no response is sent to another copy: it did not run (or its
# container died before answering, and no part of an answer reached the caller).
_FAIL_OVER_CODES = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.NOT_FOUND)


class _Request:
    """One request in flight on an upstream stream (or between two, while it fails over)."""

    __slots__ = (
        "caller_id",
        "data",
        "deadline",
        "done",
        "failover",
        "model",
        "name",
        "refused",
        "responded",
        "sink",
        "swallow_final",
        "timer",
        "upstream",
        "upstream_id",
    )

    def __init__(
        self,
        upstream_id: str,
        caller_id: str,
        name: str | None,
        swallow_final: bool,
        sink: Sink,
        model: ModelVersion,
        data: bytes,
        deadline: float,
    ) -> None:
        self.upstream_id = upstream_id
        self.caller_id = caller_id
        self.name = name  # the public name to show (Triton answers with its internal one), or None
        self.swallow_final = swallow_final  # the caller did not ask for the empty final response
        self.sink: Sink | None = sink  # None once the caller gave up on it
        self.model = model
        self.data = data  # the bytes sent up (kept to resend them to another copy)
        self.deadline = deadline  # time.monotonic() by which it must be over
        self.upstream: Upstream | None = None
        self.timer: asyncio.TimerHandle | None = None
        self.done = False  # its final response (or an error) came, or its upstream stream ended
        self.responded = False  # the caller has been given a response: never resent after that
        self.refused: set[str] = set()  # containers that failed it before any response
        self.failover: asyncio.Task[None] | None = None  # moving it to another copy


# One response for a client stream: (upstream bytes, what they say, the request), an in-stream error
# answer ready to write (bytes), or None when the client's request pump has finished.
Item = tuple[bytes, StreamResponse, _Request] | bytes | None


class Sink:
    """Where one client stream's responses land, in arrival order, and its requests in flight."""

    def __init__(self) -> None:
        self.items: deque[Item] = deque()
        self.requests: set[_Request] = set()
        self.error: BaseException | None = None
        self.buffered_bytes = 0
        self._wake: asyncio.Future[None] | None = None  # the consumer, waiting for items

    def push(self, item: Item, size_bytes: int = 0) -> None:
        self.items.append(item)
        self.buffered_bytes += size_bytes
        if self._wake is not None and not self._wake.done():
            self._wake.set_result(None)

    def fail(self, error: BaseException) -> None:
        if self.error is None:
            self.error = error
        if self._wake is not None and not self._wake.done():
            self._wake.set_result(None)

    @property
    def overflowing(self) -> bool:
        """The caller left more than SINK_LIMIT_BYTES unread (one response of any size always fits)."""
        return self.buffered_bytes > SINK_LIMIT_BYTES and len(self.items) > 1

    async def take(self) -> list[Item]:
        """Every item waiting (at least one); raises the sink's error once the items before it are taken."""
        while not self.items:
            if self.error is not None:
                raise self.error
            self._wake = asyncio.get_running_loop().create_future()
            await self._wake
        items = list(self.items)
        self.items.clear()
        self.buffered_bytes = 0
        return items

    def close(self, error: BaseException) -> None:
        """The consumer is gone: nothing more is kept for it."""
        self.error = self.error or error
        self.items.clear()
        self.buffered_bytes = 0


class Upstream:
    """One long-lived `ModelStreamInfer` call to one container for one model version, shared by callers."""

    def __init__(self, pool: StreamPool, container: Container, model: ModelVersion) -> None:
        self.pool = pool
        self.container = container
        self.model = model
        self.capacity = REQUESTS_PER_UPSTREAM if model.backend == "triton" else 1
        self.requests: dict[str, _Request] = {}
        self.live = 0  # requests whose caller still waits
        self.retiring = False  # takes no new requests; cancelled once no caller waits on it
        self.write_lock = asyncio.Lock()
        self.call: grpc.aio.StreamStreamCall = pool.channels.stream(container.address, STREAM_METHOD)(
            metadata=pool.metadata()
        )
        self._idle: asyncio.TimerHandle | None = None
        self.reader = asyncio.create_task(self._read(), name=f"upstream-{container.id}-{model.key}")

    @property
    def open_for_more(self) -> bool:
        return not self.retiring and self.live < self.capacity

    def add(self, request: _Request) -> None:
        request.upstream = self
        request.done = False
        self.requests[request.upstream_id] = request
        self.live += 1
        outstanding = self.pool.channels.outstanding
        outstanding[self.container.id] = outstanding.get(self.container.id, 0) + 1
        if self._idle is not None:
            self._idle.cancel()
            self._idle = None

    def _finish(self, request: _Request) -> None:
        """The request is over (its final response, an error, or its stream's end)."""
        if self.requests.pop(request.upstream_id, None) is None:
            return
        request.done = True
        self.pool.channels.outstanding[self.container.id] -= 1
        self.pool.slot_freed(self.container.id)
        if request.timer is not None:
            request.timer.cancel()
        if request.sink is not None:
            request.sink.requests.discard(request)
            self.live -= 1
        self._settle()

    def _detach(self, request: _Request) -> bool:
        """Takes a request no response has reached off this stream, to send it to another copy; the
        caller keeps waiting for it (it stays in its sink's requests)."""
        if self.requests.pop(request.upstream_id, None) is None:
            return False
        self.pool.channels.outstanding[self.container.id] -= 1
        self.pool.slot_freed(self.container.id)
        self.live -= 1
        request.upstream = None
        self._settle()
        return True

    def abandon(self, request: _Request) -> None:
        """The caller no longer waits for `request` (it went away, or its deadline passed)."""
        if request.sink is None or request.done:
            return
        request.sink.requests.discard(request)
        request.sink = None
        self.live -= 1
        if request.timer is not None:
            request.timer.cancel()
        if not request.done:
            # The container still works on it: take no more requests here, and stop the stream (and that
            # work) once no other caller's request is on it.
            self.retiring = True
            self.pool.forget(self)
        self._settle()

    def _settle(self) -> None:
        if self.live:
            return
        if self.retiring:
            self.call.cancel()  # only abandoned requests are left: stop the container's work
        elif not self.requests and self._idle is None:
            self._idle = asyncio.get_running_loop().call_later(IDLE_CLOSE_S, self._close_idle)

    def _close_idle(self) -> None:
        self._idle = None
        if not self.requests:
            self.retiring = True
            self.pool.forget(self)
            self.call.cancel()

    async def _read(self) -> None:
        error = UpstreamFailed(grpc.StatusCode.UNAVAILABLE, f"container {self.container.id}: stream ended")
        try:
            while True:
                response = await self.call.read()
                if response is grpc.aio.EOF:
                    break
                self._dispatch(response)
        except grpc.aio.AioRpcError as exc:
            error = UpstreamFailed(exc.code(), f"container {self.container.id}: {exc.details()}")
        except asyncio.CancelledError:
            error = UpstreamFailed(grpc.StatusCode.CANCELLED, "the router closed the upstream stream")
        except Exception as exc:  # a malformed response: the stream cannot be trusted any more
            log.warning("container %s: bad stream response (%s); closing the stream", self.container.id, exc)
            error = UpstreamFailed(grpc.StatusCode.INTERNAL, f"container {self.container.id}: {exc}")
        finally:
            self.retiring = True
            self.pool.forget(self)
            if not self.call.done():
                self.call.cancel()
            for request in list(self.requests.values()):
                if request.sink is not None and error.code in _FAIL_OVER_CODES and not request.responded:
                    if self._detach(request):
                        self.pool.fail_over(request, self.container, error)
                    continue
                if request.sink is not None:
                    request.sink.fail(error)
                self._finish(request)

    def _dispatch(self, response: bytes) -> None:
        info = StreamResponse(response)
        request = self.requests.get(info.request_id) if info.request_id is not None else None
        if request is None and info.error is not None and info.request_id is None and self.requests:
            # An error without an id (our own container's): its requests run one at a time, in order.
            request = next(iter(self.requests.values()))
        if request is None:
            return  # a response to a request whose caller gave up (and whose id was forgotten)
        sink = request.sink
        if (
            sink is not None
            and info.error is not None
            and not request.responded
            and stream_error_code(info.error) in _FAIL_OVER_CODES
        ):
            # The copy is stale (the container dropped the model before the store said so) or not ready:
            # the request did not run there, so it goes to another copy, as a unary call's NOT_FOUND does.
            if self._detach(request):
                error = UpstreamFailed(stream_error_code(info.error), _public_error(request, info.error))
                self.pool.fail_over(request, self.container, error)
            return
        if info.error is not None:  # as the caller should read it, once for every consumer
            info.error = _caller_error(request, self.container.id, info.error)
        if info.error is not None or info.final:
            self._finish(request)
        if sink is None or (
            request.swallow_final and info.final and not info.has_outputs and info.error is None
        ):
            if sink is not None:
                sink.push((b"", info, request))  # the request is over; nothing to show the caller
            return
        request.responded = True
        sink.push((response, info, request), len(response))
        if sink.overflowing:  # never wait for one caller: every caller on this stream would wait
            sink.fail(
                UpstreamFailed(
                    grpc.StatusCode.RESOURCE_EXHAUSTED,
                    f"more than {SINK_LIMIT_BYTES} bytes of responses left unread: read faster",
                )
            )
            for waiting in list(sink.requests):
                self.pool.abandon(waiting)


class StreamPool:
    """The router's upstream streams, per (container, model version): made by the Router, closed when it
    stops (no upstream stream outlives it)."""

    def __init__(
        self, channels: ContainerChannels, fleet_secret: str | None = None, router: Router | None = None
    ) -> None:
        self.channels = channels
        self.fleet_secret = fleet_secret
        self.upstreams: dict[tuple[str, str], list[Upstream]] = {}
        self._ids = itertools.count(1)
        self._router = router  # its owner: the copies to fail over to
        self._failovers: set[asyncio.Task[None]] = set()
        self.failed_over = 0  # requests sent to another copy after theirs failed before any response

    def slot_freed(self, container_id: str) -> None:
        """A request on a container ended: a unary call waiting for the container at its bound may go
        (router/container_queue.py; stream requests themselves do not wait there)."""
        router = self._router
        if router is not None and container_id in router.queues.waiting:
            router.queues.release(container_id)

    def metadata(self) -> tuple[tuple[str, str], ...]:
        """The router's own headers: a shared stream carries no caller's headers (tenant, trace)."""
        return ((FLEET_SECRET_HEADER, self.fleet_secret),) if self.fleet_secret else ()

    def _acquire(self, container: Container, model: ModelVersion) -> Upstream:
        streams = self.upstreams.setdefault((container.id, model.key), [])
        best: Upstream | None = None
        for upstream in streams:
            if upstream.open_for_more and (best is None or upstream.live < best.live):
                best = upstream
        if best is None:
            best = Upstream(self, container, model)
            streams.append(best)
        return best

    def forget(self, upstream: Upstream) -> None:
        streams = self.upstreams.get((upstream.container.id, upstream.model.key))
        if streams is not None and upstream in streams:
            streams.remove(upstream)
            if not streams:
                del self.upstreams[(upstream.container.id, upstream.model.key)]

    async def submit(
        self,
        container: Container,
        model: ModelVersion,
        routed: bytes,
        caller_id: str,
        *,
        sink: Sink,
        swallow_final: bool,
        timeout_s: float | None,
    ) -> _Request:
        """Sends a routed request on a pooled stream; its responses will land in `sink`.

        `timeout_s` (None: the router's default deadline) bounds the request, failovers included."""
        name = model.name if model.backend in PER_VERSION_NAME_BACKENDS else None
        upstream_id = str(next(self._ids))
        data = with_stream_request_id(routed, upstream_id)
        router = self._router
        budget = timeout_s if timeout_s is not None else (router.default_deadline_s if router else 60.0)
        deadline = time.monotonic() + budget
        request = _Request(upstream_id, caller_id, name, swallow_final, sink, model, data, deadline)
        sink.requests.add(request)
        if timeout_s is not None:
            request.timer = asyncio.get_running_loop().call_later(timeout_s, self._expire, request)
        try:
            await self._send(request, container)
        except UpstreamFailed as exc:
            if exc.code not in _FAIL_OVER_CODES:
                self.abandon(request)
                raise
            self.fail_over(request, container, exc)
        return request

    async def _send(self, request: _Request, container: Container) -> None:
        """Writes the request on a pooled stream to `container` (a second stream if the first has just
        ended); raises UpstreamFailed(UNAVAILABLE) when neither takes it (it did not run)."""
        for attempt in (1, 2):
            upstream = self._acquire(container, request.model)
            upstream.add(request)
            try:
                async with upstream.write_lock:
                    await upstream.call.write(request.data)
            except Exception as exc:  # the stream ended before the request went out: it never ran
                upstream._detach(request)
                self.forget(upstream)
                upstream.retiring = True
                if attempt == 2:
                    raise UpstreamFailed(
                        grpc.StatusCode.UNAVAILABLE, f"container {container.id}: {exc or 'stream closed'}"
                    ) from exc
                continue
            return
        raise AssertionError("unreachable")

    def fail_over(self, request: _Request, failed: Container, error: UpstreamFailed) -> None:
        """Sends `request` (which had no response) to another copy, in the background."""
        task = asyncio.get_running_loop().create_task(self._fail_over(request, failed, error))
        request.failover = task
        self._failovers.add(task)
        task.add_done_callback(self._failovers.discard)

    async def _fail_over(self, request: _Request, failed: Container, error: UpstreamFailed) -> None:
        router = self._router
        try:
            if router is None:
                raise error
            # A call of a Triton sequence is never resent where its state is not (router/sequences.py).
            sequence = read_sequence(request.data)
            while request.sink is not None:
                if sequence is not None:
                    lost = lost_sequence(sequence, request.model, failed.id, error.code, error.details)
                    if lost is not None:
                        raise lost
                request.refused.add(failed.id)
                others = [
                    c for c in router.table.ready_copies(request.model.key) if c.id not in request.refused
                ]
                container = sticky_copy(sequence.id, others) if sequence else router.channels.pick(others)
                if container is None:
                    container = await router.wait_for_replacement(
                        request.model, failed, request.refused, request.deadline
                    )
                if request.sink is None:
                    return  # the caller gave up while the copy was found
                log.info(
                    "stream request for %s: container %s failed it before any response (%s); resent to %s",
                    request.model.key,
                    failed.id,
                    error.details,
                    container.id,
                )
                self.failed_over += 1
                router.retries += 1
                try:
                    await self._send(request, container)
                    return
                except UpstreamFailed as exc:
                    failed, error = container, exc
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            sink = request.sink
            if sink is not None:
                sink.requests.discard(request)
                request.sink = None
                if request.timer is not None:
                    request.timer.cancel()
                sink.fail(exc if isinstance(exc, ModelyardError) else error)
        finally:
            request.failover = None

    def _expire(self, request: _Request) -> None:
        """The request's deadline passed."""
        sink = request.sink
        if sink is not None:
            sink.fail(UpstreamFailed(grpc.StatusCode.DEADLINE_EXCEEDED, "Deadline Exceeded"))
            self.abandon(request)

    def abandon(self, request: _Request) -> None:
        """The caller no longer waits for `request`, wherever it is (on a stream or failing over)."""
        if request.upstream is not None:
            request.upstream.abandon(request)
            return
        sink = request.sink
        if sink is None:
            return
        sink.requests.discard(request)
        request.sink = None
        if request.timer is not None:
            request.timer.cancel()
        if request.failover is not None:
            request.failover.cancel()

    async def close(self) -> None:
        """Cancels every upstream stream and failover and waits for their readers to end."""
        for task in list(self._failovers):
            task.cancel()
        upstreams = [u for streams in self.upstreams.values() for u in streams]
        self.upstreams.clear()
        for upstream in upstreams:
            upstream.call.cancel()
        await asyncio.gather(*(u.reader for u in upstreams), return_exceptions=True)


def _caller_id(request: bytes) -> str:
    """The request id the caller chose (route() has read this header already, so it parses)."""
    return read_header(request)[2]


def _routing_error(request: bytes, message: str) -> bytes:
    """The in-stream error answering a request the router could not route, with the caller's request id
    (when its bytes name one) so that the caller can tell which of its requests failed."""
    try:
        caller_id = read_header(request)[2]
    except WireError:
        caller_id = ""
    error = stream_error(message)
    return error + nested(2, response_fields(None, caller_id)) if caller_id else error


async def _write(context: grpc.aio.ServicerContext, data: bytes) -> None:
    """`context.write`; a client that went away ends the handler as a cancellation, not as an error."""
    try:
        await context.write(data)
    except Exception as exc:
        if context.cancelled():
            raise asyncio.CancelledError from exc
        raise


async def infer_stream(router: Router, request: bytes, context: grpc.aio.ServicerContext) -> None:
    """`InferStream`: one request, its responses as `InferResponse`s up to the final one (forwarded even
    when empty: it says the stream is complete). Errors end the stream with their status."""
    model, routed = router.route(request, context)
    reject_stream(model)
    container = await router.choose_copy(model, context, request=request)
    sink = Sink()
    caller_id = _caller_id(request)
    pending = await router.streams.submit(
        container,
        model,
        routed,
        caller_id,
        sink=sink,
        swallow_final=False,
        timeout_s=router.upstream_timeout(context),
    )
    suffix = response_fields(pending.name, caller_id)
    try:
        while True:
            for item in await sink.take():
                assert isinstance(item, tuple)
                response, info, _ = item
                if info.error is not None:
                    raise ContainerStreamError(info.error)
                if info.inner is None:
                    raise UpstreamFailed(grpc.StatusCode.INTERNAL, "container sent an empty stream response")
                start, stop = info.inner
                await _write(context, b"".join((memoryview(response)[start:stop], suffix)))  # one copy
                if info.final:
                    return
    finally:
        router.streams.abandon(pending)
        sink.close(asyncio.CancelledError())


async def relay(
    router: Router,
    requests: AsyncIterator[bytes],
    context: grpc.aio.ServicerContext,
    *,
    in_stream_errors: bool = True,
) -> None:
    """A bidi stream (`ModelStreamInfer`, `InferSession`): every request routed on its own, every response
    written as `ModelStreamInferResponse` bytes with the caller's request id; raises UpstreamFailed.

    The stream ends when the client has half-closed and every request it sent is over.
    """
    pool = router.streams
    sink = Sink()
    timeout_s = context.time_remaining()  # the session's deadline, if the caller set one
    slots = asyncio.Semaphore(MAX_STREAM_REQUESTS)

    async def pump() -> None:
        try:
            async for raw in requests:
                await slots.acquire()  # at most MAX_STREAM_REQUESTS in flight: backpressure on the client
                try:
                    model, routed = router.route(raw, context)
                    reject_stream(model)
                    container = await router.choose_copy(model, context, request=raw)
                    caller_id = _caller_id(raw)
                    swallow = not wants_empty_final_response(raw)
                except (ModelyardError, WireError) as exc:
                    slots.release()
                    if not in_stream_errors:
                        raise
                    sink.push(_routing_error(raw, str(exc)))
                    continue
                await pool.submit(
                    container, model, routed, caller_id, sink=sink, swallow_final=swallow, timeout_s=timeout_s
                )
            sink.push(None)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            sink.fail(exc)

    pump_task = asyncio.create_task(pump())
    half_closed = False
    try:
        while True:
            for item in await sink.take():
                if item is None:
                    half_closed = True
                elif isinstance(item, bytes):
                    await _write(context, item)
                else:
                    response, info, request = item
                    if info.error is not None or info.final:
                        slots.release()
                    if response:
                        name = None if info.error is not None else request.name
                        inner = response_fields(name, request.caller_id)
                        if info.error is not None:  # appended, its error_message wins over the container's
                            inner = stream_error(info.error) + nested(2, inner)
                            await _write(context, response + inner)
                        else:
                            await _write(context, response + nested(2, inner))  # one copy
            if half_closed and not sink.requests and not sink.items:
                return
    finally:
        pump_task.cancel()
        for request in list(sink.requests):
            pool.abandon(request)
        sink.close(asyncio.CancelledError())
        await asyncio.gather(pump_task, return_exceptions=True)
