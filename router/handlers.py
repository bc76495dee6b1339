"""The one place where errors become gRPC statuses, for every servicer method."""

from __future__ import annotations

import functools
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TypeVar

import grpc
import grpc.aio

from router.errors import RoutingError, UpstreamFailed

log = logging.getLogger(__name__)
T = TypeVar("T")
Unary = Callable[[bytes, grpc.aio.ServicerContext], Awaitable[T]]


def unary_errors(fn: Unary[T]) -> Unary[T]:
    """Routing errors -> their status; a container's error -> passed through as the container said it."""

    @functools.wraps(fn)
    async def wrapper(request: bytes, context: grpc.aio.ServicerContext) -> T:
        try:
            return await fn(request, context)
        except RoutingError as exc:
            await context.abort(exc.code, str(exc))
        except grpc.aio.AioRpcError as exc:
            await context.abort(exc.code(), exc.details() or exc.code().name)
        except Exception:
            log.exception("unexpected error in %s", fn.__name__)
            await context.abort(grpc.StatusCode.INTERNAL, f"internal router error in {fn.__name__}")
        raise AssertionError("unreachable: abort raises")

    return wrapper


def bytes_handler(fn: Unary[bytes]) -> grpc.RpcMethodHandler:
    """A unary handler that receives and returns serialized messages untouched."""
    return grpc.unary_unary_rpc_method_handler(unary_errors(fn))


StreamBehaviour = Callable[[object, grpc.aio.ServicerContext], AsyncIterator[bytes]]


def stream_errors(fn: StreamBehaviour) -> StreamBehaviour:
    """The same mapping for streaming methods: errors end the stream with their status."""

    @functools.wraps(fn)
    async def wrapper(request: object, context: grpc.aio.ServicerContext) -> AsyncIterator[bytes]:
        try:
            async for response in fn(request, context):
                yield response
        except RoutingError as exc:
            await context.abort(exc.code, str(exc))
        except UpstreamFailed as exc:
            await context.abort(exc.code, exc.details)
        except grpc.aio.AioRpcError as exc:
            await context.abort(exc.code(), exc.details() or exc.code().name)
        except Exception:
            log.exception("unexpected error in %s", fn.__name__)
            await context.abort(grpc.StatusCode.INTERNAL, f"internal router error in {fn.__name__}")

    return wrapper


def bidi_bytes_handler(fn: StreamBehaviour) -> grpc.RpcMethodHandler:
    return grpc.stream_stream_rpc_method_handler(stream_errors(fn))


def server_stream_bytes_handler(fn: StreamBehaviour) -> grpc.RpcMethodHandler:
    return grpc.unary_stream_rpc_method_handler(stream_errors(fn))
