"""The modelyard.v1 Router service (protos/modelyard/v1/router.proto)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import grpc
import grpc.aio

from modelyard.placement.model import ModelVersion
from modelyard.router.errors import BadRequest, ModelNotFound, parse_request
from modelyard.router.handlers import bidi_bytes_handler, bytes_handler, server_stream_bytes_handler
from modelyard.router.identity import Identity
from modelyard.router.kserve import SERVICE as KSERVE_SERVICE
from modelyard.router.pipeline import pipeline_name
from modelyard.router.routing import Router
from modelyard.router.stream import infer_stream, relay
from modelyard.router.table import RoutingTable
from modelyard.v1 import router_pb2

SERVICE = "modelyard.v1.Router"
_MODEL_INFER = f"/{KSERVE_SERVICE}/ModelInfer"


def api_handler(router: Router) -> grpc.GenericRpcHandler:
    # Handlers carry their RPC's name: it labels spans and metrics (`method`).
    async def Infer(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        # InferRequest/InferResponse are wire-compatible with KServe's: the bytes go to Triton as they are.
        if pipeline_name(router, request) is not None:
            return await router.pipelines.infer(request, context)
        return await router.forward_unary(_MODEL_INFER, request, context)

    async def WhereIs(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        # A limited tenant reads no addresses: its calls go through the router and its limits.
        identity = router.routes_for(router.identify(context))
        query = parse_request(router_pb2.WhereIsRequest, request)
        if not query.model_name:
            raise BadRequest("model_name is required")
        table = router.table
        fleet = table.fleet
        # Versions private to other tenants do not exist here: the same answers as RoutingTable.resolve's.
        versions = visible_versions(table, query.model_name, identity.tenant)
        if not versions:
            raise ModelNotFound(f"model '{query.model_name}' is not registered")
        if query.model_version and query.model_version not in versions:
            raise ModelNotFound(f"model '{query.model_name}' has no version '{query.model_version}'")
        answer = router_pb2.WhereIsResponse(generation=fleet.generation)
        for version in sorted(versions):
            if query.model_version and version != query.model_version:
                continue
            key = versions[version].key
            location = answer.locations.add(model_name=query.model_name, model_version=version)
            for cid in sorted(fleet.assignments.get(key, ())):
                container = fleet.containers.get(cid)
                state = fleet.states.get((cid, key))
                location.copies.add(
                    container_id=cid,
                    # Addresses only for route readers (the zero-hop client): containers are not for callers.
                    address=container.address if container and identity.routes else "",
                    state=state.phase if state else ("assigned" if container else "lost"),
                    message=state.message if state else "",
                )
        return answer.SerializeToString()

    async def InferStream(request: bytes, context: grpc.aio.ServicerContext) -> None:
        identity = router.identify(context)  # a caller without valid credentials: the stream ends at once
        # One request on a pooled upstream stream: an error ends the stream with its status.
        if pipeline_name(router, request) is not None:
            await router.pipelines.infer_stream(request, context)  # admitted there, once
            return
        with router.admission.admitted(identity.tenant):  # an open stream is a call in flight
            await infer_stream(router, request, context)

    async def InferSession(requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext) -> None:
        identity = router.identify(context)  # a caller without valid credentials: the stream ends at once
        # StreamResponse and InferRequest are wire-compatible with KServe's stream messages: pure relay.
        with router.admission.admitted(identity.tenant):  # an open stream is a call in flight
            await relay(router, requests, context)

    async def WatchRoutes(request: bytes, context: grpc.aio.ServicerContext) -> None:
        caller = router.identify(context)
        identity = router.routes_for(caller)  # a limited tenant reads no addresses
        query = parse_request(router_pb2.WatchRoutesRequest, request)
        wanted = set(query.model_names)
        table = router.table
        watch = table.watch()
        try:
            await router.follower.first_load.wait()
            # Only what the caller may call: a model private to another tenant is never mentioned.
            names = visible_names(table, identity.tenant)
            sent = {n for n in names if not wanted or n in wanted}
            await context.write(_update(table, sent, identity, snapshot=True))
            while True:
                await watch.event.wait()
                await asyncio.sleep(0.01)  # let a burst of store events coalesce into one update
                changed, everything = watch.take()
                identity = router.routes_for(caller)  # its tenant's limits may have changed
                names = (table.names() | sent) if everything else changed
                names = {n for n in names if not wanted or n in wanted}
                # A name the caller never saw and still cannot see is nobody's business.
                names = {n for n in names if n in sent or visible_versions(table, n, identity.tenant)}
                if names:
                    update = _update(table, names, identity)
                    sent = (sent | names) - {
                        n for n in names if not visible_versions(table, n, identity.tenant)
                    }
                    await context.write(update)
        finally:
            table.unwatch(watch)

    telemetry = router.telemetry
    methods = {
        n: bytes_handler(fn, telemetry, service=SERVICE)
        for n, fn in {"Infer": Infer, "WhereIs": WhereIs}.items()
    }
    methods["InferStream"] = server_stream_bytes_handler(InferStream, telemetry, service=SERVICE)
    methods["WatchRoutes"] = server_stream_bytes_handler(WatchRoutes)
    methods["InferSession"] = bidi_bytes_handler(InferSession, telemetry, service=SERVICE)
    return grpc.method_handlers_generic_handler(SERVICE, methods)


def visible_versions(table: RoutingTable, name: str, tenant: str | None) -> dict[str, ModelVersion]:
    """The versions of `name` that `tenant` may call (all public ones and its own private ones)."""
    return {v: m for v, m in table.versions(name).items() if m.visible_to(tenant)}


def visible_names(table: RoutingTable, tenant: str | None) -> set[str]:
    return {
        name
        for name, versions in table.fleet.by_name.items()
        if any(m.visible_to(tenant) for m in versions.values())
    }


def model_routes(table: RoutingTable, name: str, identity: Identity) -> router_pb2.ModelRoutes:
    """`name`'s routes as `identity` may see them: its visible versions (a private version lists only the
    caller as its tenant), ready copies' addresses only for route readers, and of the route rule only
    what can choose among those versions (the same choice as the whole rule's: router/versions.py)."""
    tenant = identity.tenant
    entry = router_pb2.ModelRoutes(model_name=name)
    versions = visible_versions(table, name, tenant)
    for version, model in sorted(versions.items()):
        route = entry.versions.add(version=version, tenants=[tenant] if model.tenants and tenant else [])
        if identity.routes:
            for container in table.ready_copies(model.key):
                if container.backend == "sagemaker":
                    continue  # HTTP, not KServe gRPC: zero-hop clients call these through the router
                route.ready.add(container_id=container.id, address=container.address, state="ready")
    rule = table.fleet.routes.get(name)
    if rule is not None:
        entry.has_rule = True
        if rule.default_version in versions:
            entry.rule.default_version = rule.default_version
        pinned = dict(rule.tenant_versions).get(tenant or "")
        if tenant and pinned in versions:
            entry.rule.tenant_versions[tenant] = pinned
        entry.rule.weights.update({v: w for v, w in rule.weights if v in versions})
    return entry


def _update(table: RoutingTable, names: set[str], identity: Identity, *, snapshot: bool = False) -> bytes:
    update = router_pb2.RouteUpdate(snapshot=snapshot, generation=table.fleet.generation)
    for name in sorted(names):
        if visible_versions(table, name, identity.tenant):
            update.models.append(model_routes(table, name, identity))
        else:
            update.removed.append(name)
    return update.SerializeToString()
