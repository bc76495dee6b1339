"""The modelyard.v1 Router service (protos/modelyard/v1/router.proto)."""

from __future__ import annotations

import grpc
import grpc.aio

from modelyard.v1 import router_pb2
from router.core import Router
from router.errors import BadRequest, ModelNotFound
from router.handlers import bytes_handler
from router.kserve import SERVICE as KSERVE_SERVICE

SERVICE = "modelyard.v1.Router"
_MODEL_INFER = f"/{KSERVE_SERVICE}/ModelInfer"


def api_handler(router: Router) -> grpc.GenericRpcHandler:
    async def infer(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        # InferRequest/InferResponse are wire-compatible with KServe's: the bytes go to Triton as they are.
        return await router.forward_unary(_MODEL_INFER, request, context)

    async def where_is(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        try:
            query = router_pb2.WhereIsRequest.FromString(request)
        except Exception as exc:  # protobuf's DecodeError
            raise BadRequest(f"malformed WhereIsRequest: {exc}") from exc
        if not query.model_name:
            raise BadRequest("model_name is required")
        table = router.table
        fleet = table.fleet
        versions = table.versions(query.model_name)
        if not versions or (query.model_version and query.model_version not in versions):
            raise ModelNotFound(
                f"model '{query.model_name}'"
                + (f" has no version '{query.model_version}'" if versions else " is not registered")
            )
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
                    address=container.address if container else "",
                    state=state.phase if state else ("assigned" if container else "lost"),
                    message=state.message if state else "",
                )
        return answer.SerializeToString()

    handlers = {"Infer": infer, "WhereIs": where_is}
    return grpc.method_handlers_generic_handler(SERVICE, {n: bytes_handler(fn) for n, fn in handlers.items()})
