"""The reference hop for router benchmarks: a bare grpc.aio pass-through proxy to one upstream.

Bytes in, bytes out; it reads the model name (field 1) as a router must, and does nothing else — no
routing table, tenancy, retries or telemetry. Run: python benchmarks/minimal_proxy.py LISTEN UPSTREAM
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import AsyncIterator

import grpc
import grpc.aio

OPTIONS = (("grpc.max_send_message_length", -1), ("grpc.max_receive_message_length", -1))


def model_name(data: bytes) -> bytes:
    """Field 1 of a KServe request, assuming (as serializers do) it comes first with a one-byte length."""
    return data[2 : 2 + data[1]] if len(data) > 1 and data[0] == 0x0A else b""


async def main(listen: str, upstream: str) -> None:
    channel = grpc.aio.insecure_channel(upstream, options=OPTIONS)

    class PassThrough(grpc.GenericRpcHandler):
        def service(self, details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler:
            method = details.method
            if method.endswith("StreamInfer"):
                stream = channel.stream_stream(method)

                async def bidi(
                    requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext
                ) -> AsyncIterator[bytes]:
                    async for response in stream(requests):
                        yield response

                return grpc.stream_stream_rpc_method_handler(bidi)
            unary = channel.unary_unary(method)

            async def call(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
                model_name(request)
                response: bytes = await unary(request)
                return response

            return grpc.unary_unary_rpc_method_handler(call)

    server = grpc.aio.server(options=OPTIONS)
    server.add_generic_rpc_handlers((PassThrough(),))
    server.add_insecure_port(listen)
    await server.start()
    print("proxy ready", flush=True)
    await server.wait_for_termination()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], sys.argv[2]))
