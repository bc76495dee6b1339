"""Our own KServe v2 container: many small numpy models (numpy_model.py) in one grpc.aio process.

`ModelHost` (hosting.py) is the data plane: loaded versions keyed by (name, version), the memory
budget, loads (one per key however many callers, files read off the event loop), unloads that drain
in-flight requests, and statistics. `KServeServicer` (here) is the thin `inference.GRPCInferenceService`
front: conversion.py converts protobuf to numpy and back, and every error becomes a gRPC status in
one place (`status_of`: the one family of modelyard/errors.py by the status on its class).
`CustomContainer` and `run_container` serve it.

Load a model with `RepositoryModelLoad`: `model_name`, parameters `artifact_uri` (string, a `file://`
model directory; required) and `version` (string, default "1"). `RepositoryModelUnload` takes an optional
`version` parameter (default: every version) and succeeds when nothing is loaded, so it is idempotent.

Closed to strangers: with a fleet secret, every call but the gRPC health check must carry the header
`triton-grpc-protocol-modelyard-fleet-secret` (as Triton's restricted protocols check it), and with a
model store, artifacts load only from inside it. Model math runs in a thread pool, so a slow model never
stalls the event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hmac
import logging
import signal
import socket
import time
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import grpc
import grpc.aio
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from tritonclient.grpc import model_config_pb2 as config_pb2
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc as pb_grpc

from modelyard import metric_names as names
from modelyard.errors import BadRequest, ModelNotFound, ModelyardError
from modelyard.fleet_secret import FLEET_SECRET_HEADER
from modelyard.grpc_options import (
    DEFAULT_MAX_MESSAGE_BYTES,
    container_server_options,
    message_size_options,
)
from modelyard.numpy_container import MEMORY_BYTES_TRAILER
from modelyard.numpy_container.conversion import (
    config_tensors,
    decode_inputs,
    infer_one,
    infer_response,
    requested_outputs,
    statistics_of,
    string_parameter,
    tensor_metadata,
)
from modelyard.numpy_container.hosting import DRAIN_TIMEOUT_S, ModelHost
from modelyard.numpy_container.numpy_model import (
    NumpyModel,
    TensorError,
    load_model_dir,
)
from modelyard.telemetry import Telemetry

log = logging.getLogger(__name__)

SERVER_NAME = "modelyard-container"
SERVER_VERSION = "0.1.0"
DEFAULT_VERSION = "1"
FINAL_RESPONSE = "triton_final_response"  # the response parameter Triton sets on a decoupled model's last
_OPEN_METHODS = ("/grpc.health.v1.Health/",)  # probes (kubelet) call these without the secret


# --- the gRPC front -------------------------------------------------------------------------------------

H = TypeVar("H", bound="KServeServicer")
Unary = Callable[[H, Any, grpc.aio.ServicerContext], Awaitable[Any]]


def status_of(exc: Exception) -> tuple[grpc.StatusCode, str]:
    """The one mapping from errors to gRPC statuses, for unary calls and in-stream errors alike (call
    from an except block)."""
    if isinstance(exc, ModelyardError):
        return exc.code, exc.details
    log.exception("unexpected container error")
    return grpc.StatusCode.INTERNAL, f"internal container error: {type(exc).__name__}: {exc}"


def _unary(fn: Unary[H]) -> Unary[H]:
    """Errors of a unary method -> its gRPC status."""

    @functools.wraps(fn)
    async def wrapper(self: H, request: Any, context: grpc.aio.ServicerContext) -> Any:
        telemetry = self.telemetry
        span_context: Any = (
            telemetry.start_server_span(fn.__name__, context.invocation_metadata(), service=KSERVE_SERVICE)
            if telemetry is not None and telemetry.tracing
            else contextlib.nullcontext()
        )
        with span_context as span:
            if span is not None:
                span.set_attribute("modelyard.model", getattr(request, "model_name", ""))
            try:
                response = await fn(self, request, context)
                if span is not None:
                    span.set_attribute("rpc.grpc.status_code", grpc.StatusCode.OK.value[0])
                return response
            except Exception as exc:
                code, message = status_of(exc)
                if span is not None:
                    span.set_attribute("rpc.grpc.status_code", code.value[0])
        await context.abort(code, message)

    return wrapper


KSERVE_SERVICE = pb.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name


class KServeServicer(pb_grpc.GRPCInferenceServiceServicer):
    """`inference.GRPCInferenceService` over a ModelHost. Shared memory, trace, log calls: UNIMPLEMENTED."""

    def __init__(self, host: ModelHost, telemetry: Telemetry | None = None) -> None:
        self.host = host
        self.telemetry = telemetry

    @_unary
    async def ServerLive(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        return pb.ServerLiveResponse(live=True)

    @_unary
    async def ServerReady(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        return pb.ServerReadyResponse(ready=True)

    @_unary
    async def ServerMetadata(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        return pb.ServerMetadataResponse(
            name=SERVER_NAME,
            version=SERVER_VERSION,
            extensions=["model_repository", "model_configuration", "statistics"],
        )

    @_unary
    async def ModelReady(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        # Like Triton: an unknown, unloading or still-loading model is "not ready", not an error.
        try:
            loaded = self.host.resolve(request.name, request.version)
        except ModelNotFound:
            return pb.ModelReadyResponse(ready=False)
        return pb.ModelReadyResponse(ready=not loaded.unloading)

    @_unary
    async def ModelMetadata(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        loaded = self.host.resolve(request.name, request.version)
        versions = (
            [loaded.version]
            if request.version
            else [v.version for v in self.host.versions(request.name) if not v.unloading]
        )
        return pb.ModelMetadataResponse(
            name=loaded.name,
            versions=versions,
            platform="numpy",
            inputs=tensor_metadata(loaded.model.inputs),
            outputs=tensor_metadata(loaded.model.outputs),
        )

    @_unary
    async def ModelConfig(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        loaded = self.host.resolve(request.name, request.version)
        model = loaded.model
        config = config_pb2.ModelConfig(
            name=loaded.name,
            backend="numpy",
            max_batch_size=0,
            input=config_tensors(model.inputs, config_pb2.ModelInput),
            output=config_tensors(model.outputs, config_pb2.ModelOutput),
        )
        config.parameters["op"].string_value = model.op
        if model.decoupled:
            config.model_transaction_policy.decoupled = True
        return pb.ModelConfigResponse(config=config)

    @_unary
    async def ModelStatistics(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        if not request.name:
            selected = self.host.all_versions()
        elif request.version:
            found = self.host.find(request.name, request.version)
            if found is None:
                raise ModelNotFound(f"model '{request.name}' version '{request.version}' is not loaded")
            selected = [found]
        else:
            selected = self.host.versions(request.name)
            if not selected:
                raise ModelNotFound(f"model '{request.name}' is not loaded")
        return pb.ModelStatisticsResponse(model_stats=[statistics_of(v) for v in selected])

    @_unary
    async def ModelInfer(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        with self.host.serving(request.model_name, request.model_version) as loaded:
            if loaded.model.decoupled:
                raise BadRequest(
                    f"model '{loaded.name}' is decoupled (op {loaded.model.op}): call ModelStreamInfer"
                )
            start_ns = time.perf_counter_ns()
            try:
                response = await self.host.run(infer_one, loaded, request)
            except Exception as exc:
                loaded.record(start_ns, ok=False)
                if isinstance(exc, TensorError):
                    raise BadRequest(f"model '{loaded.name}' version '{loaded.version}': {exc}") from exc
                raise
            loaded.record(start_ns, ok=True)
            return response

    async def ModelStreamInfer(
        self, request_iterator: AsyncIterator[Any], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[Any]:
        """Bidi: each request's responses in order; an error is an `error_message` and the stream goes on."""
        async for request in request_iterator:
            try:
                async with contextlib.aclosing(self._stream_responses(request)) as responses:
                    async for response in responses:
                        yield pb.ModelStreamInferResponse(infer_response=response)
            except Exception as exc:
                yield pb.ModelStreamInferResponse(error_message=status_of(exc)[1])

    async def _stream_responses(self, request: Any) -> AsyncGenerator[Any, None]:
        """One request's responses, each sent as produced; the last carries triton_final_response=true."""
        with self.host.serving(request.model_name, request.model_version) as loaded:
            start_ns = time.perf_counter_ns()
            try:
                model = loaded.model
                inputs = await self.host.run(decode_inputs, request, model)
                names = requested_outputs(request, model)
                pending = None
                steps = model.stream(inputs)
                while (outputs := await self.host.run(next, steps, None)) is not None:
                    if pending is not None:
                        yield pending
                    pending = infer_response(loaded, request, outputs, names)
                    pending.parameters[FINAL_RESPONSE].bool_param = False
                if pending is None:  # nothing to stream: an empty response carries the final flag
                    pending = pb.ModelInferResponse(
                        model_name=loaded.name, model_version=loaded.version, id=request.id
                    )
            except Exception as exc:
                loaded.record(start_ns, ok=False)
                if isinstance(exc, TensorError):
                    raise BadRequest(f"model '{loaded.name}' version '{loaded.version}': {exc}") from exc
                raise
            pending.parameters[FINAL_RESPONSE].bool_param = True
            loaded.record(start_ns, ok=True)
            yield pending

    @_unary
    async def RepositoryIndex(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        rows = self.host.index()
        return pb.RepositoryIndexResponse(
            models=[
                pb.RepositoryIndexResponse.ModelIndex(name=name, version=version, state=state)
                for name, version, state in rows
                if not request.ready or state == "READY"
            ]
        )

    @_unary
    async def RepositoryModelLoad(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        if not request.model_name:
            raise BadRequest("model_name is required")
        version = string_parameter(request.parameters, "version") or DEFAULT_VERSION
        artifact_uri = string_parameter(request.parameters, "artifact_uri")
        if not artifact_uri:
            raise BadRequest(f"loading model '{request.model_name}' needs the parameter artifact_uri")
        loaded = await self.host.load(request.model_name, version, artifact_uri)
        context.set_trailing_metadata(((MEMORY_BYTES_TRAILER, str(loaded.model.memory_bytes)),))
        return pb.RepositoryModelLoadResponse()

    @_unary
    async def RepositoryModelUnload(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        if not request.model_name:
            raise BadRequest("model_name is required")
        await self.host.unload(request.model_name, string_parameter(request.parameters, "version"))
        return pb.RepositoryModelUnloadResponse()


class FleetSecretCheck(grpc.aio.ServerInterceptor):
    """Refuses every call without the fleet secret header (UNAUTHENTICATED), the health check excepted."""

    def __init__(self, secret: str) -> None:
        self.secret = secret.encode()

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        if handler is None or details.method.startswith(_OPEN_METHODS):
            return handler
        for key, value in details.invocation_metadata or ():
            if key == FLEET_SECRET_HEADER:
                given = value if isinstance(value, bytes) else str(value).encode()
                if hmac.compare_digest(given, self.secret):
                    return handler
        return _refusal(handler)


def _refusal(handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
    """A handler of `handler`'s kind that answers UNAUTHENTICATED without reading the request."""
    message = f"this container serves only its fleet: the {FLEET_SECRET_HEADER} header is missing or wrong"

    async def refuse(request: Any, context: grpc.aio.ServicerContext) -> None:
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

    if handler.request_streaming and handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(refuse)
    if handler.request_streaming:
        return grpc.stream_unary_rpc_method_handler(refuse)
    if handler.response_streaming:
        return grpc.unary_stream_rpc_method_handler(refuse)
    return grpc.unary_unary_rpc_method_handler(refuse)


class CustomContainer:
    """A KServe v2 gRPC server hosting numpy models under a memory budget."""

    def __init__(
        self,
        memory_bytes: int,
        *,
        loader: Callable[[Path], NumpyModel] = load_model_dir,
        drain_timeout_s: float = DRAIN_TIMEOUT_S,
        telemetry: Telemetry | None = None,
        server_credentials: grpc.ServerCredentials | None = None,
        fleet_secret: str | None = None,
        model_store: Path | None = None,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
    ) -> None:
        """`fleet_secret`: calls must carry it; `model_store`: load only from inside it."""
        self.models = ModelHost(
            memory_bytes, loader=loader, drain_timeout_s=drain_timeout_s, model_store=model_store
        )
        self.telemetry = telemetry
        self.server_credentials = server_credentials
        self.fleet_secret = fleet_secret
        self.max_message_bytes = max_message_bytes
        self._server: grpc.aio.Server | None = None
        self._address = ""

    @property
    def address(self) -> str:
        if not self._address:
            raise RuntimeError("the container is not started")
        return self._address

    @property
    def memory_bytes(self) -> int:
        return self.models.memory_bytes

    @property
    def used_bytes(self) -> int:
        return self.models.used_bytes

    @property
    def load_count(self) -> int:
        return self.models.load_count

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> None:
        options = (*message_size_options(self.max_message_bytes), *container_server_options())
        interceptors = [FleetSecretCheck(self.fleet_secret)] if self.fleet_secret else []
        server = grpc.aio.server(options=options, interceptors=interceptors)
        pb_grpc.add_GRPCInferenceServiceServicer_to_server(
            KServeServicer(self.models, self.telemetry), server
        )
        health_servicer = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
        service = pb.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name
        for name in ("", service):
            await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
        health_name = health_pb2.DESCRIPTOR.services_by_name["Health"].full_name
        reflection.enable_server_reflection((service, health_name, reflection.SERVICE_NAME), server)
        target = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        try:
            if self.server_credentials is not None:
                bound = server.add_secure_port(target, self.server_credentials)
            else:
                bound = server.add_insecure_port(target)
        except RuntimeError as exc:
            raise OSError(f"cannot listen on {target}: {exc}") from exc
        if not bound:
            raise OSError(f"cannot listen on {target}")
        await server.start()
        self._server = server
        self._address = f"[{host}]:{bound}" if ":" in host else f"{host}:{bound}"

    async def wait(self) -> None:
        """Returns when the server stops."""
        if self._server is not None:
            await self._server.wait_for_termination()

    async def stop(self, grace_s: float = 5.0) -> None:
        if self._server is not None:
            await self._server.stop(grace_s)
            self._server = None
        self.models.compute.shutdown(wait=False)


async def run_container(
    host: str,
    port: int,
    memory_bytes: int,
    telemetry: Telemetry | None = None,
    server_credentials: grpc.ServerCredentials | None = None,
    *,
    fleet_secret: str | None = None,
    model_store: Path | None = None,
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
    drain_s: float = 10.0,
) -> None:
    """Serves a container until cancelled or SIGTERM/SIGINT; prints `container listening on HOST:PORT` once
    it accepts calls. On a signal it refuses new calls and gives those in flight `drain_s` to finish."""
    container = CustomContainer(
        memory_bytes,
        telemetry=telemetry,
        server_credentials=server_credentials,
        fleet_secret=fleet_secret,
        model_store=model_store,
        max_message_bytes=max_message_bytes,
    )
    await container.start(host, port)
    if telemetry is not None and telemetry.metrics:
        # The host name: a pod's name on Kubernetes, which is also its agent's container id there.
        host = socket.gethostname()
        telemetry.gauge(
            names.CONTAINER_MEMORY,
            lambda: [
                (float(container.used_bytes), {"container": host, "kind": "used"}),
                (float(container.memory_bytes), {"container": host, "kind": "capacity"}),
            ],
            "Bytes loaded (used) and the memory budget (capacity), as this container counts them",
        )
        telemetry.serve_metrics()
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stopping.set)
    print(f"container listening on {container.address}", flush=True)
    try:
        await stopping.wait()  # not container.wait(): cancelling that cancels the server's own shutdown
    finally:
        await container.stop(drain_s)
