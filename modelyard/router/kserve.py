"""The KServe v2 `inference.GRPCInferenceService` front: any tritonclient works against the router.

Server-level calls are answered by the router itself; model-level calls go to a ready copy as bytes.
`RepositoryIndex` lists the fleet's models the caller may call. Methods not listed (repository control,
shared memory, tracing, logging) answer UNIMPLEMENTED: they concern one Triton instance, not the fleet.
For a tenant, a model private to another tenant does not exist on any of these calls.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable

import grpc
import grpc.aio
from tritonclient.grpc import service_pb2 as kserve

from modelyard.errors import ModelyardError
from modelyard.router.admission import Overloaded
from modelyard.router.errors import NotReady, parse_request
from modelyard.router.handlers import bidi_bytes_handler, bytes_handler
from modelyard.router.identity import PermissionDenied, Unauthenticated
from modelyard.router.pipeline import pipeline_name
from modelyard.router.routing import Router
from modelyard.router.stream import relay

SERVICE = "inference.GRPCInferenceService"
SERVER_NAME = "modelyard"
SERVER_VERSION = "0.1.0"


def kserve_handler(router: Router) -> grpc.GenericRpcHandler:
    def forward(method: str) -> Callable[[bytes, grpc.aio.ServicerContext], Awaitable[bytes]]:
        path = f"/{SERVICE}/{method}"

        async def call(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
            # No pipeline registered (the usual fleet): one attribute chain, not a call, on every request.
            if router.table.fleet.pipelines_by_name and pipeline_name(router, request) is not None:
                return await router.pipelines.unary(method, request, context)
            return await router.forward_unary(path, request, context)

        call.__name__ = method
        return call

    # Handlers carry their RPC's name: it labels spans and metrics (`method`).
    async def ServerLive(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        return kserve.ServerLiveResponse(live=True).SerializeToString()

    async def ServerReady(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        return kserve.ServerReadyResponse(ready=router.ready).SerializeToString()

    async def ServerMetadata(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        return kserve.ServerMetadataResponse(name=SERVER_NAME, version=SERVER_VERSION).SerializeToString()

    async def ModelReady(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        # Like Triton: an unknown or unloaded model is "not ready", not an error; asking loads nothing.
        if pipeline_name(router, request) is not None:
            return await router.pipelines.unary("ModelReady", request, context)
        try:
            path = f"/{SERVICE}/ModelReady"
            return await router.forward_unary(path, request, context, lazy_load=False)
        except ModelyardError as exc:
            if exc.code == grpc.StatusCode.INVALID_ARGUMENT or isinstance(
                exc, (NotReady, Unauthenticated, PermissionDenied, Overloaded)
            ):
                raise
            return kserve.ModelReadyResponse(ready=False).SerializeToString()

    async def RepositoryIndex(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        """Every version the caller may call, READY when a copy is ready (no container names)."""
        tenant = router.identify(context).tenant
        query = parse_request(kserve.RepositoryIndexRequest, request)
        if not router.ready:
            raise NotReady("routing table not loaded yet")
        table = router.table
        answer = kserve.RepositoryIndexResponse()
        for name, versions in sorted(table.fleet.by_name.items()):
            for version, model in sorted(versions.items()):
                if not model.visible_to(tenant):
                    continue
                ready = bool(table.ready_copies(model.key))
                if query.ready and not ready:
                    continue
                answer.models.add(name=name, version=version, state="READY" if ready else "UNAVAILABLE")
        runner = router.pipelines
        for name, pipelines in sorted(table.fleet.pipelines_by_name.items()):
            for version, pipeline in sorted(pipelines.items()):
                if not pipeline.visible_to(tenant) or name in table.fleet.by_name:
                    continue
                ready = runner.is_ready(pipeline, tenant)
                if query.ready and not ready:
                    continue
                answer.models.add(name=name, version=version, state="READY" if ready else "UNAVAILABLE")
        return answer.SerializeToString()

    handlers = {
        "ServerLive": ServerLive,
        "ServerReady": ServerReady,
        "ServerMetadata": ServerMetadata,
        "ModelReady": ModelReady,
        "ModelMetadata": forward("ModelMetadata"),
        "ModelConfig": forward("ModelConfig"),
        "ModelStatistics": forward("ModelStatistics"),
        "ModelInfer": forward("ModelInfer"),
        "RepositoryIndex": RepositoryIndex,
    }

    async def ModelStreamInfer(requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext) -> None:
        identity = router.identify(context)  # a caller without valid credentials: the stream ends at once
        with router.admission.admitted(identity.tenant):  # an open stream is a call in flight
            await relay(router, requests, context)

    telemetry = router.telemetry
    methods = {name: bytes_handler(fn, telemetry, service=SERVICE) for name, fn in handlers.items()}
    methods["ModelStreamInfer"] = bidi_bytes_handler(ModelStreamInfer, telemetry, service=SERVICE)
    return grpc.method_handlers_generic_handler(SERVICE, methods)
