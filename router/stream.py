"""Relaying streams: KServe `ModelStreamInfer` (bidi) and modelyard.v1 `InferSession` / `InferStream`.

Each request in a stream is routed on its own (model, version, tenant); requests for copies on the same
container share one upstream stream to it, so responses keep their order per container (Triton's order
for one stream). Bytes pass through undecoded. A request that cannot be routed gets an in-stream error
response, as Triton answers a bad request in a stream, and the stream goes on. An upstream stream that
fails ends the whole stream with the container's status: it is never retried, since responses may
already have been delivered.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass

import grpc
import grpc.aio

from modelyard.telemetry import CURRENT_CALL
from placement.model import Container
from router.core import Router
from router.errors import NoReadyCopy, RoutingError, UpstreamFailed
from router.wire import stream_error

STREAM_METHOD = "/inference.GRPCInferenceService/ModelStreamInfer"


@dataclass
class _Upstream:
    container: Container
    requests: asyncio.Queue[bytes | None]
    task: asyncio.Task[None]


Send = Callable[[bytes], Awaitable[None]]


async def relay(
    router: Router, requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext, send: Send
) -> None:
    """Routes every request and hands every response to `send` as it arrives; raises UpstreamFailed.

    Responses go from the task reading each container's stream straight to `send` (one lock keeps
    writes whole), so a response costs no extra hop through the router's event loop.
    """
    upstreams: dict[str, _Upstream] = {}
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

    async def emit(data: bytes) -> None:
        async with write_lock:
            await send(data)

    async def feed(queue: asyncio.Queue[bytes | None]) -> AsyncIterator[bytes]:
        while (item := await queue.get()) is not None:
            yield item

    async def drain(container: Container, queue: asyncio.Queue[bytes | None]) -> None:
        outstanding[container.id] = outstanding.get(container.id, 0) + 1
        error: BaseException | None = None
        try:
            upstream_call = router.channels.stream(container.address, STREAM_METHOD)(
                feed(queue), timeout=context.time_remaining(), metadata=metadata
            )
            async for response in upstream_call:
                await emit(response)
        except grpc.aio.AioRpcError as exc:
            error = UpstreamFailed(exc.code(), f"container {container.id}: {exc.details()}")
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # `send` refused a response (InferStream: the container's error)
            error = exc
        finally:
            outstanding[container.id] -= 1
            done(error)

    async def pump() -> None:
        nonlocal pending
        error: BaseException | None = None
        try:
            async for raw in requests:
                try:
                    model, raw = router.route(raw, context)
                    copies = router.table.ready_copies(model.key) or await router.lazy.ready_copies(
                        model, context.time_remaining()
                    )
                    # Prefer a container this stream already talks to, keeping its requests in order.
                    container = next((c for c in copies if c.id in upstreams), None) or router.channels.pick(
                        copies
                    )
                    if container is None:
                        raise NoReadyCopy(f"model '{model.name}' version '{model.version}' has no ready copy")
                    if call is not None:
                        call.container = container.id
                except RoutingError as exc:
                    await emit(stream_error(str(exc)))
                    continue
                upstream = upstreams.get(container.id)
                if upstream is None:
                    queue: asyncio.Queue[bytes | None] = asyncio.Queue()
                    pending += 1
                    task = asyncio.create_task(drain(container, queue))
                    upstream = upstreams[container.id] = _Upstream(container, queue, task)
                upstream.requests.put_nowait(raw)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            error = exc
        finally:
            for upstream in upstreams.values():
                upstream.requests.put_nowait(None)  # half-close: the container finishes what it has
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
