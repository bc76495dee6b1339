"""What a container says, as the caller should read it: the model's public name instead of the internal
one Triton and MLServer know each version by (`name@version`), and the caller's own request id on pooled
streams. Used by forwarding (router/routing.py) and the stream pool (router/stream.py)."""

from __future__ import annotations

import grpc
import grpc.aio
from tritonclient.grpc import service_pb2 as kserve

from modelyard.containers.triton.adapter import triton_model_name
from modelyard.placement.model import PER_VERSION_NAME_BACKENDS, ModelVersion
from modelyard.router.wire import with_name, with_nested_name

_KSERVE = "/inference.GRPCInferenceService/"
_MODEL_INFER = _KSERVE + "ModelInfer"
_MODEL_METADATA = _KSERVE + "ModelMetadata"
_MODEL_CONFIG = _KSERVE + "ModelConfig"
_MODEL_STATISTICS = _KSERVE + "ModelStatistics"


def public_response(model: ModelVersion, method: str, response: bytes) -> bytes:
    """A container's answer to a model-level call, showing the model's public name (not Triton's own).

    Triton and MLServer know each version by its internal name (containers/triton/, containers/mlserver/)
    and answer with it; the version needs no change (the internal model's one version is the public one).
    """
    if model.backend not in PER_VERSION_NAME_BACKENDS:
        return response
    if method == _MODEL_INFER or method == _MODEL_METADATA:
        return with_name(response, model.name)  # ModelInferResponse.model_name / ModelMetadataResponse.name
    if method == _MODEL_CONFIG:
        return with_nested_name(response, 1, model.name)  # ModelConfigResponse.config.name
    if method == _MODEL_STATISTICS:  # small, and its names sit in a repeated field: decode it
        stats = kserve.ModelStatisticsResponse.FromString(response)
        for entry in stats.model_stats:
            entry.name = model.name
        return bytes(stats.SerializeToString())
    return response


def public_stream_response(model: ModelVersion, response: bytes) -> bytes:
    """A `ModelStreamInferResponse` showing the public model name. One that starts with field 2 carries an
    `infer_response` and no `error_message` (fields are written in number order); errors pass untouched."""
    if model.backend not in PER_VERSION_NAME_BACKENDS or response[:1] != b"\x12":
        return response
    return with_nested_name(response, 2, model.name)


def public_error(
    model: ModelVersion, message: str, upstream_id: str | None = None, caller_id: str = ""
) -> str:
    """A container's error message as the caller should read it: the model as the caller names it (Triton
    and MLServer quote their internal name, 'scale@1'), and on a pooled stream the caller's request id,
    not the one the router sent up in its place (Triton starts the message with "[request id: ID] ")."""
    if upstream_id is not None:
        sent = f"[request id: {upstream_id}] "
        if message.startswith(sent):
            message = (f"[request id: {caller_id}] " if caller_id else "") + message[len(sent) :]
    if model.backend in PER_VERSION_NAME_BACKENDS:
        internal = triton_model_name(model.name, model.version)
        if internal in message:
            message = message.replace(f"'{internal}'", f"'{model.name}' version '{model.version}'")
            message = message.replace(internal, f"{model.name} version {model.version}")
    return message


def public_rpc_error(model: ModelVersion, exc: grpc.aio.AioRpcError) -> grpc.aio.AioRpcError:
    """`exc` with its details as the caller should read them (public_error); the same error if unchanged."""
    details = exc.details() or ""
    public = public_error(model, details)
    if public == details:
        return exc
    return grpc.aio.AioRpcError(
        exc.code(), exc.initial_metadata(), exc.trailing_metadata(), public, exc.debug_error_string()
    )
