"""The routing core: from a call's header fields and metadata to a ready copy, and forwarding to it.

Servicers stay thin: they hand bytes and the call context here and get bytes back or a RoutingError.
"""

from __future__ import annotations

import grpc
import grpc.aio

from modelyard.telemetry import CURRENT_CALL, TRACE_HEADERS, Telemetry
from placement.model import Container, ModelVersion
from placement.store import Store
from router.errors import BadRequest, NoReadyCopy
from router.follow import TableFollower
from router.forward import ContainerChannels, forwarded_metadata
from router.lazy import LazyLoader
from router.table import RoutingTable
from router.wire import WireError, read_header, with_version

TENANT_HEADER = "x-tenant-id"


def tenant_of(context: grpc.aio.ServicerContext) -> str | None:
    for item in context.invocation_metadata() or ():
        if item.key == TENANT_HEADER:
            return str(item.value)
    return None


class Router:
    def __init__(
        self,
        store: Store,
        telemetry: Telemetry | None = None,
        upstream_credentials: grpc.ChannelCredentials | None = None,
    ) -> None:
        self.store = store
        self.telemetry = telemetry
        self.table = RoutingTable()
        self.follower = TableFollower(store, self.table)
        self.channels = ContainerChannels(upstream_credentials)
        self.lazy = LazyLoader(store, self.table, telemetry)
        self.retries = 0  # unary calls sent to a second copy after UNAVAILABLE

    async def start(self) -> None:
        self.follower.start()

    async def stop(self) -> None:
        await self.follower.stop()
        await self.channels.close()

    @property
    def ready(self) -> bool:
        return self.table.loaded

    def route(self, request: bytes, context: grpc.aio.ServicerContext) -> tuple[ModelVersion, bytes]:
        """The model version a request goes to, and the bytes to send (version pinned when it matters)."""
        try:
            name, version, request_id = read_header(request)
        except WireError as exc:
            raise BadRequest(f"malformed request: {exc}") from exc
        if not name:
            raise BadRequest("model_name is required")
        tenant = tenant_of(context)
        call = CURRENT_CALL.get()
        if call is not None:  # before resolving, so a refused call is still counted under its model
            call.model, call.version, call.tenant = name, version, tenant or ""
        model = self.table.resolve(name, version, tenant, request_id)
        if call is not None:
            call.version = model.version
        # With several versions registered, the container must not pick its own default.
        if not version and len(self.table.versions(name)) > 1:
            request = with_version(request, model.version)
        return model, request

    async def forward_unary(
        self, method: str, request: bytes, context: grpc.aio.ServicerContext, *, lazy_load: bool = True
    ) -> bytes:
        """Sends `request` to a ready copy; with `lazy_load`, a model with none is loaded first."""
        model, request = self.route(request, context)
        copies = self.table.ready_copies(model.key)
        if not copies and lazy_load:
            copies = await self.lazy.ready_copies(model, context.time_remaining())
        container = self.channels.pick(copies)
        if container is None:
            raise NoReadyCopy(f"model '{model.name}' version '{model.version}' has no ready copy")
        try:
            return await self._call(container, method, request, context)
        except grpc.aio.AioRpcError as exc:
            # UNAVAILABLE on a unary call: the container never accepted it, so a second copy is safe.
            retry_on = self.channels.pick(copies, exclude=container.id)
            if exc.code() != grpc.StatusCode.UNAVAILABLE or retry_on is None:
                raise
            self.retries += 1
            call = CURRENT_CALL.get()
            if call is not None:
                call.retries += 1
            return await self._call(retry_on, method, request, context)

    def upstream_metadata(self, context: grpc.aio.ServicerContext) -> tuple[tuple[str, str | bytes], ...]:
        """The caller's metadata for the container; with tracing, the trace context becomes this span's."""
        metadata = forwarded_metadata(context)
        if self.telemetry is not None and self.telemetry.tracing:
            metadata = (*((k, v) for k, v in metadata if k not in TRACE_HEADERS), *self.telemetry.inject())
        return metadata

    async def _call(
        self, container: Container, method: str, request: bytes, context: grpc.aio.ServicerContext
    ) -> bytes:
        outstanding = self.channels.outstanding
        outstanding[container.id] = outstanding.get(container.id, 0) + 1
        call = CURRENT_CALL.get()
        if call is not None:
            call.container = container.id
        try:
            response: bytes = await self.channels.unary(container.address, method)(
                request, timeout=context.time_remaining(), metadata=self.upstream_metadata(context)
            )
            return response
        finally:
            outstanding[container.id] -= 1
