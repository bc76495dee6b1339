"""Relaying streams: KServe `ModelStreamInfer` (bidi) and modelyard.v1 `InferSession` / `InferStream`.

Each request in a stream is routed on its own (model, version, tenant). Requests for one model version on
one container share one upstream stream, and nothing else does: Triton writes responses of decoupled and
plain models through two paths that break its one-write-at-a-time rule and aborts (SIGABRT) when one
stream carries both, so an upstream stream never mixes models. Responses keep their order per request and
per model (Triton's order on one stream); request ids pass through. Bytes pass through undecoded.

Flow control: each upstream stream takes requests from a bounded queue, so a slow container makes the
router stop reading the client's requests (gRPC then holds the client back); responses are written with
`context.write`, which waits for the client. Cancellation runs both ways: a client that goes away cancels
every upstream stream, and an upstream stream that fails ends the client's stream with its status (never
retried, since responses may already have been delivered).

A request that cannot be routed gets an in-stream error response on the bidi fronts, as Triton answers a
bad request in a stream, and the stream goes on; `InferStream` (one request) ends with the error's status.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass

import grpc
import grpc.aio

from modelyard.telemetry import CURRENT_CALL
from placement.model import Container, ModelVersion
from router.core import Router
from router.errors import NoReadyCopy, RoutingError, TooManyUpstreams, UpstreamFailed
from router.wire import stream_error

STREAM_METHOD = "/inference.GRPCInferenceService/ModelStreamInfer"
UPSTREAM_QUEUE_DEPTH = 32  # requests waiting for one upstream stream before the client is held back
MAX_UPSTREAMS = 64  # upstream streams (container x model version) one client stream may open


@dataclass
class _Upstream:
    container: Container
    model: ModelVersion
    requests: asyncio.Queue[bytes | None]
    task: asyncio.Task[None]


# Called with each response of a model's upstream stream, in order.
Send = Callable[[bytes, ModelVersion], Awaitable[None]]


async def relay(
    router: Router,
    requests: AsyncIterator[bytes],
    context: grpc.aio.ServicerContext,
    send: Send,
    *,
    in_stream_errors: bool = True,
    timeout_s: float | None = None,
) -> None:
    """Routes every request and hands every response to `send` as it arrives; raises UpstreamFailed.

    With `in_stream_errors`, a request that cannot be routed is answered in the stream (`context.write`)
    and the stream goes on; without, the RoutingError ends the stream with its status. `timeout_s` bounds
    every upstream stream (None: the caller's deadline, if any).
    """
    upstreams: dict[tuple[str, str], _Upstream] = {}
    if timeout_s is None:
        timeout_s = context.time_remaining()  # the caller's deadline travels to the container
    metadata = router.upstream_metadata(context)
    outstanding = router.channels.outstanding
    call = CURRENT_CALL.get()
    write_lock = asyncio.Lock()
    finished: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    pending = 1  # the request pump, plus one per upstream

    def done(error: BaseException | None = None) -> None:
        nonlocal pending
        pending -= 1
        if finished.done():
            return
        if error is not None:
            finished.set_exception(error)
        elif pending == 0:
            finished.set_result(None)

    async def feed(queue: asyncio.Queue[bytes | None]) -> AsyncIterator[bytes]:
        while (item := await queue.get()) is not None:
            yield item

    async def drain(container: Container, model: ModelVersion, queue: asyncio.Queue[bytes | None]) -> None:
        outstanding[container.id] = outstanding.get(container.id, 0) + 1
        error: BaseException | None = None
        upstream_call: grpc.aio.StreamStreamCall | None = None
        try:
            upstream_call = router.channels.stream(container.address, STREAM_METHOD)(
                feed(queue), timeout=timeout_s, metadata=metadata
            )
            async for response in upstream_call:
                async with write_lock:  # one write at a time on the client's stream
                    await send(response, model)
        except grpc.aio.AioRpcError as exc:
            error = UpstreamFailed(exc.code(), f"container {container.id}: {exc.details()}")
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # `send` refused a response (InferStream: the container's error)
            error = exc
        finally:
            if upstream_call is not None and not upstream_call.done():
                upstream_call.cancel()  # the client went away or another upstream failed
            outstanding[container.id] -= 1
            done(error)

    def choose(model: ModelVersion) -> Container:
        copies = router.table.ready_copies(model.key)
        # Prefer the copy this stream already sends the model to: its requests stay in order.
        container = next((c for c in copies if (c.id, model.key) in upstreams), None)
        container = container or router.channels.pick(copies)
        if container is None:
            raise NoReadyCopy(f"model '{model.name}' version '{model.version}' has no ready copy")
        if (container.id, model.key) not in upstreams and len(upstreams) >= MAX_UPSTREAMS:
            raise TooManyUpstreams(
                f"this stream already calls {MAX_UPSTREAMS} model versions; open another stream"
            )
        return container

    async def pump() -> None:
        nonlocal pending
        error: BaseException | None = None
        closing = True
        try:
            async for raw in requests:
                try:
                    model, raw = router.route(raw, context)
                    if not router.table.ready_copies(model.key):
                        await router.lazy.ready_copies(model, context.time_remaining())
                    container = choose(model)
                    if call is not None:
                        call.container = container.id
                except RoutingError as exc:
                    if not in_stream_errors:
                        raise
                    async with write_lock:
                        await context.write(stream_error(str(exc)))
                    continue
                upstream = upstreams.get((container.id, model.key))
                if upstream is None:
                    queue: asyncio.Queue[bytes | None] = asyncio.Queue(UPSTREAM_QUEUE_DEPTH)
                    pending += 1
                    task = asyncio.create_task(drain(container, model, queue))
                    upstream = upstreams[(container.id, model.key)] = _Upstream(container, model, queue, task)
                await upstream.requests.put(raw)  # waits while the container is behind: backpressure
        except asyncio.CancelledError:
            closing = False
            raise
        except Exception as exc:
            error = exc
        finally:
            if closing:
                for upstream in upstreams.values():
                    if not upstream.task.done():
                        await upstream.requests.put(None)  # half-close: the container finishes its work
            done(error)

    pump_task = asyncio.create_task(pump())
    try:
        await finished
    finally:
        pump_task.cancel()
        for upstream in upstreams.values():
            upstream.task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.gather(pump_task, *(u.task for u in upstreams.values()), return_exceptions=True)
