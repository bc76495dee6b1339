"""The anchor of the router benchmarks: the least a Python gRPC hop can do, a grpc.aio pass-through.

Generic handler, bytes in and bytes out (no serializers), one channel to one upstream and one handler per
method built once and cached (never per call). Unary calls go through as they came; a bidi stream
(`ModelStreamInfer`) is relayed message by message on one upstream stream per client stream. No routing
table, tenancy, retries, renaming or telemetry: the router cannot be cheaper than this and do its job.

Containers take only calls carrying the fleet secret: with SECRET, every upstream call carries it (one
constant header, as the router sends its own).

It runs as tuned as `modelyard serve` runs the router, so the router is compared with the best Python hop,
not a handicapped one: the same event loop (`run_event_loop`: uvloop unless MODELYARD_EVENT_LOOP=asyncio),
the same malloc settings (`reuse_large_buffers` for the same largest message) and the same gRPC server and
channel options (message limits; the channel's reconnect backoff).

Run: python benchmarks/minimal_proxy.py LISTEN UPSTREAM [SECRET]
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import AsyncIterator

import grpc
import grpc.aio

from modelyard.cli import run_event_loop
from modelyard.grpc_options import (
    DEFAULT_MAX_MESSAGE_BYTES,
    container_channel_options,
    message_size_options,
)
from modelyard.memory import reuse_large_buffers


class PassThrough(grpc.GenericRpcHandler):
    def __init__(self, channel: grpc.aio.Channel, secret: str | None) -> None:
        self.channel = channel
        self.metadata = (("triton-grpc-protocol-modelyard-fleet-secret", secret),) if secret else None
        self.handlers: dict[str, grpc.RpcMethodHandler] = {}

    def service(self, details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler:
        method: str = details.method
        handler = self.handlers.get(method)
        if handler is None:
            handler = self.handlers[method] = self._handler(method)
        return handler

    def _handler(self, method: str) -> grpc.RpcMethodHandler:
        metadata = self.metadata
        if method.endswith("StreamInfer"):
            stream = self.channel.stream_stream(method)

            async def bidi(
                requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext
            ) -> AsyncIterator[bytes]:
                async for response in stream(requests, metadata=metadata):
                    yield response

            return grpc.stream_stream_rpc_method_handler(bidi)
        unary = self.channel.unary_unary(method)

        async def call(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
            response: bytes = await unary(request, metadata=metadata)
            return response

        return grpc.unary_unary_rpc_method_handler(call)


async def main(listen: str, upstream: str, secret: str | None) -> None:
    channel = grpc.aio.insecure_channel(upstream, options=container_channel_options())
    server = grpc.aio.server(options=message_size_options(DEFAULT_MAX_MESSAGE_BYTES))
    server.add_generic_rpc_handlers((PassThrough(channel, secret),))
    server.add_insecure_port(listen)
    await server.start()
    loop = type(asyncio.get_running_loop()).__module__.partition(".")[0]
    print(f"proxy ready (event loop: {loop}, malloc tuned: {TUNED_MALLOC})", flush=True)
    await server.wait_for_termination()


TUNED_MALLOC = False

if __name__ == "__main__":
    # As `modelyard serve` does for the router (modelyard/cli.py), before any large buffer is allocated.
    TUNED_MALLOC = reuse_large_buffers(DEFAULT_MAX_MESSAGE_BYTES)
    run_event_loop(main(sys.argv[1], sys.argv[2], sys.argv[3] if len(sys.argv) > 3 else None))
