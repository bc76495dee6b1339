"""The one place where errors become gRPC statuses, for every servicer method."""

from __future__ import annotations

import contextlib
import functools
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import grpc
import grpc.aio

from modelyard.errors import ModelyardError
from modelyard.telemetry import CURRENT_CALL, CallInfo, Telemetry, status_code_number

log = logging.getLogger(__name__)
T = TypeVar("T")
Unary = Callable[[bytes, grpc.aio.ServicerContext], Awaitable[T]]


async def _abort(
    context: grpc.aio.ServicerContext,
    code: grpc.StatusCode,
    details: str,
    trailers: tuple[tuple[str, str], ...] = (),
) -> None:
    call = CURRENT_CALL.get()
    if call is not None:
        call.code = code.name
    await context.abort(code, details, trailers)


def _status(exc: Exception, method: str) -> tuple[grpc.StatusCode, str, tuple[tuple[str, str], ...]]:
    """The one mapping from an error to the status (and trailers, e.g. grpc-retry-pushback-ms) a caller
    gets, for unary and streaming methods."""
    if isinstance(exc, ModelyardError):
        return exc.code, exc.details, exc.trailers
    if isinstance(exc, grpc.aio.AioRpcError):  # a container's status, passed on as it said it
        return exc.code(), exc.details() or exc.code().name, ()
    log.exception("unexpected error in %s", method)
    return grpc.StatusCode.INTERNAL, f"internal router error in {method}", ()


def unary_errors(fn: Unary[T]) -> Unary[T]:
    """Our errors -> their status; a container's error -> passed through as the container said it."""

    @functools.wraps(fn)
    async def wrapper(request: bytes, context: grpc.aio.ServicerContext) -> T:
        try:
            return await fn(request, context)
        except Exception as exc:
            await _abort(context, *_status(exc, fn.__name__))
        raise AssertionError("unreachable: abort raises")

    return wrapper


StreamBehaviour = Callable[[Any, grpc.aio.ServicerContext], Awaitable[None]]


def stream_errors(fn: StreamBehaviour) -> StreamBehaviour:
    """The same mapping for streaming methods (which write with `context.write`): errors end the stream
    with their status."""

    @functools.wraps(fn)
    async def wrapper(request: Any, context: grpc.aio.ServicerContext) -> None:
        try:
            await fn(request, context)
        except Exception as exc:
            await _abort(context, *_status(exc, fn.__name__))

    return wrapper


def _observed(
    fn: Callable[[Any, grpc.aio.ServicerContext], Awaitable[T]],
    telemetry: Telemetry,
    *,
    stream: bool,
    service: str,
) -> Callable[[Any, grpc.aio.ServicerContext], Awaitable[T]]:
    """A server span (`service/method`, OpenTelemetry's RPC conventions) and the request metrics around one
    call (unary, or a whole stream)."""
    method = fn.__name__

    @functools.wraps(fn)
    async def wrapper(request: Any, context: grpc.aio.ServicerContext) -> T:
        call = CallInfo(method)
        token = CURRENT_CALL.set(call)
        start = time.perf_counter()
        span_context: Any = (
            telemetry.start_server_span(method, context.invocation_metadata(), service=service)
            if telemetry.tracing
            else contextlib.nullcontext()
        )
        if telemetry.metrics:
            telemetry.in_flight[method] = telemetry.in_flight.get(method, 0) + 1
            telemetry.streams_open += stream
        try:
            with span_context as span:
                try:
                    return await fn(request, context)
                finally:
                    if span is not None:
                        span.set_attributes(_span_attributes(call))
        finally:
            CURRENT_CALL.reset(token)
            if telemetry.metrics:
                telemetry.streams_open -= stream
                _record(telemetry, call, time.perf_counter() - start)

    return wrapper


def _span_attributes(call: CallInfo) -> dict[str, str | int]:
    return {
        "modelyard.model": call.model,
        "modelyard.version": call.version,
        "modelyard.tenant": call.tenant,
        "modelyard.container": call.container,
        "modelyard.retries": call.retries,
        "rpc.grpc.status_code": status_code_number(call.code),
    }


def _record(telemetry: Telemetry, call: CallInfo, seconds: float) -> None:
    telemetry.in_flight[call.method] -= 1
    model, tenant = call.model_label, call.tenant_label  # bounded (router/routing.py), unlike call.model
    telemetry.requests.add(1, {"method": call.method, "model": model, "tenant": tenant, "code": call.code})
    telemetry.duration.record(seconds, {"method": call.method, "model": model})
    if call.retries:
        telemetry.retries.add(call.retries, {"model": model})


def bytes_handler(
    fn: Unary[bytes], telemetry: Telemetry | None = None, *, service: str = ""
) -> grpc.RpcMethodHandler:
    """A unary handler that receives and returns serialized messages untouched; `service` names its gRPC
    service in spans."""
    handler = unary_errors(fn)
    if telemetry is not None and telemetry.enabled:
        handler = _observed(handler, telemetry, stream=False, service=service)
    return grpc.unary_unary_rpc_method_handler(handler)


def bidi_bytes_handler(
    fn: StreamBehaviour, telemetry: Telemetry | None = None, *, service: str = ""
) -> grpc.RpcMethodHandler:
    handler = stream_errors(fn)
    if telemetry is not None and telemetry.enabled:
        handler = _observed(handler, telemetry, stream=True, service=service)
    return grpc.stream_stream_rpc_method_handler(handler)


def server_stream_bytes_handler(
    fn: StreamBehaviour, telemetry: Telemetry | None = None, *, service: str = ""
) -> grpc.RpcMethodHandler:
    handler = stream_errors(fn)
    if telemetry is not None and telemetry.enabled:
        handler = _observed(handler, telemetry, stream=True, service=service)
    return grpc.unary_stream_rpc_method_handler(handler)
