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
from collections.abc import AsyncIterator
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


_DONE = object()


async def relay(
    router: Router, requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext
) -> AsyncIterator[bytes]:
    """Yields the responses of every upstream stream as they arrive; raises UpstreamFailed."""
    out: asyncio.Queue[object] = asyncio.Queue()
    upstreams: dict[str, _Upstream] = {}
    producers = 1  # the request pump, plus one per upstream
    metadata = router.upstream_metadata(context)
    outstanding = router.channels.outstanding
    call = CURRENT_CALL.get()

    async def feed(queue: asyncio.Queue[bytes | None]) -> AsyncIterator[bytes]:
        while (item := await queue.get()) is not None:
            yield item

    async def drain(container: Container, queue: asyncio.Queue[bytes | None]) -> None:
        outstanding[container.id] = outstanding.get(container.id, 0) + 1
        try:
            call = router.channels.stream(container.address, STREAM_METHOD)(
                feed(queue), timeout=context.time_remaining(), metadata=metadata
            )
            async for response in call:
                await out.put(response)
        except grpc.aio.AioRpcError as exc:
            await out.put(UpstreamFailed(exc.code(), f"container {container.id}: {exc.details()}"))
        finally:
            outstanding[container.id] -= 1
            await out.put(_DONE)

    async def pump() -> None:
        nonlocal producers
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
                    await out.put(stream_error(str(exc)))
                    continue
                upstream = upstreams.get(container.id)
                if upstream is None:
                    queue: asyncio.Queue[bytes | None] = asyncio.Queue()
                    producers += 1
                    task = asyncio.create_task(drain(container, queue))
                    upstream = upstreams[container.id] = _Upstream(container, queue, task)
                await upstream.requests.put(raw)
        finally:
            for upstream in upstreams.values():
                await upstream.requests.put(None)  # half-close: the container finishes what it has
            await out.put(_DONE)

    pump_task = asyncio.create_task(pump())
    try:
        while producers:
            item = await out.get()
            if item is _DONE:
                producers -= 1
            elif isinstance(item, UpstreamFailed):
                raise item
            else:
                yield item  # type: ignore[misc]
    finally:
        pump_task.cancel()
        for upstream in upstreams.values():
            upstream.task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.gather(pump_task, *(u.task for u in upstreams.values()), return_exceptions=True)
