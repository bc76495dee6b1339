"""Malformed metadata, names and tensors thrown at every router RPC (hypothesis), against a real router and
our container: every call ends with a clear status (never UNKNOWN or INTERNAL, never a hang), the router
keeps serving, and no answer to a caller who is not acme holds anything of acme's private model."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import replace

import grpc
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tritonclient.grpc import service_pb2 as kserve

from modelyard.fleet_secret import FLEET_SECRET_HEADER
from modelyard.v1 import router_pb2
from tests.fleet import FleetThread, start_custom_fleet
from tests.test_lazy_load import scale_model

PRIVATE = "acme_only"
KSERVE = "/inference.GRPCInferenceService/"
ROUTER = "/modelyard.v1.Router/"
UNARY = [KSERVE + m for m in ("ModelInfer", "ModelMetadata", "ModelReady", "ModelConfig", "ModelStatistics",
                              "RepositoryIndex", "ServerLive", "ServerReady", "ServerMetadata")]  # fmt: skip
UNARY += [ROUTER + "Infer", ROUTER + "WhereIs"]
SERVER_STREAMS = [ROUTER + "InferStream", ROUTER + "WatchRoutes"]
BIDI = [KSERVE + "ModelStreamInfer", ROUTER + "InferSession"]
NEVER = {grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL, grpc.StatusCode.DEADLINE_EXCEEDED}


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FleetThread]:
    root = tmp_path_factory.mktemp("fuzz")
    models = [
        scale_model(root / "models", "pub", 2.0),
        replace(scale_model(root / "models", PRIVATE, 3.0), tenants=("acme",)),
    ]
    thread = start_custom_fleet(root / "fleet", models)
    try:
        yield thread
    finally:
        thread.stop()


# gRPC metadata: lowercase keys of [a-z0-9-_.], printable ASCII values.
header_keys = st.sampled_from(
    ["x-tenant-id", "authorization", FLEET_SECRET_HEADER, "traceparent"]
) | st.from_regex(r"\A[a-z][a-z0-9_.-]{0,20}\Z").filter(
    lambda k: not k.startswith("grpc-") and not k.endswith("-bin")
)
# (Values the gRPC client itself refuses to send — control characters, edge spaces — never reach the router.)
header_values = st.sampled_from(["acme", "beta", "", "Bearer x", "Bearer", "ACME"]) | st.from_regex(
    r"\A([!-~]([ -~]{0,38}[!-~])?)?\Z"
)
metadata = st.lists(st.tuples(header_keys, header_values), max_size=4)
names = st.sampled_from(["pub", PRIVATE, "", "missing", "acme_only@1", "../etc", "pub\x00"]) | st.text(
    max_size=30
)
datatypes = st.sampled_from(["FP32", "FP16", "INT64", "BYTES", "BOOL", "", "NOPE"])


@st.composite
def infer_requests(draw: st.DrawFn) -> bytes:
    request = kserve.ModelInferRequest(
        model_name=draw(names), model_version=draw(st.sampled_from(["", "1", "2", "x"]))
    )
    request.id = draw(st.text(max_size=10))
    for _ in range(draw(st.integers(0, 2))):
        tensor = request.inputs.add(
            name=draw(st.sampled_from(["INPUT", "OTHER", ""])), datatype=draw(datatypes)
        )
        tensor.shape.extend(draw(st.lists(st.integers(-3, 1 << 40), max_size=3)))
        if draw(st.booleans()):
            tensor.contents.fp32_contents.extend(draw(st.lists(st.floats(width=32), max_size=8)))
        else:
            request.raw_input_contents.append(draw(st.binary(max_size=64)))
    return bytes(request.SerializeToString())


@st.composite
def other_requests(draw: st.DrawFn) -> bytes:
    name = draw(names)
    message = draw(
        st.sampled_from(
            [
                kserve.ModelMetadataRequest(name=name),
                kserve.ModelStatisticsRequest(name=name),
                kserve.RepositoryIndexRequest(ready=True),
                router_pb2.WhereIsRequest(model_name=name),
                router_pb2.WatchRoutesRequest(model_names=[name]),
            ]
        )
    )
    return bytes(message.SerializeToString())


requests = infer_requests() | other_requests() | st.binary(max_size=200)


def may_see_private(headers: list[tuple[str, str]]) -> bool:
    return any(k == "x-tenant-id" and v == "acme" for k, v in headers)


def call(
    address: str, method: str, request: bytes, headers: list[tuple[str, str]]
) -> tuple[grpc.StatusCode, bytes]:
    """(status, everything the router answered: response bytes and status details)."""
    with grpc.insecure_channel(address) as channel:
        try:
            if method in UNARY:
                answer = channel.unary_unary(method)(request, timeout=15, metadata=headers)
                return grpc.StatusCode.OK, answer
            if method in SERVER_STREAMS:
                stream = channel.unary_stream(method)(request, timeout=15, metadata=headers)
                # WatchRoutes never ends by itself: its first update is the answer.
                answer = b"".join(stream) if method.endswith("InferStream") else next(iter(stream))
                stream.cancel()
                return grpc.StatusCode.OK, answer
            stream = channel.stream_stream(method)(iter([request, request]), timeout=15, metadata=headers)
            return grpc.StatusCode.OK, b"".join(stream)
        except grpc.RpcError as exc:
            return exc.code(), (exc.details() or "").encode()


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(method=st.sampled_from(UNARY + SERVER_STREAMS + BIDI), request=requests, headers=metadata)
def test_malformed_calls_get_a_clear_status_and_nothing_of_another_tenant(
    fleet: FleetThread, method: str, request: bytes, headers: list[tuple[str, str]]
) -> None:
    code, answer = call(fleet.address, method, request, headers)
    assert code not in NEVER, (code, answer)
    if not may_see_private(headers) and PRIVATE.encode() not in request:
        assert PRIVATE.encode() not in answer, answer  # never learned from the router


def test_the_router_still_serves_after_the_fuzzing(fleet: FleetThread) -> None:
    request = kserve.ModelInferRequest(model_name=PRIVATE)
    tensor = request.inputs.add(name="INPUT", datatype="FP32", shape=[1])
    tensor.contents.fp32_contents.append(1.0)
    with grpc.insecure_channel(fleet.address) as channel:
        answer = channel.unary_unary(KSERVE + "ModelInfer")(
            request.SerializeToString(), timeout=15, metadata=(("x-tenant-id", "acme"),)
        )
    assert kserve.ModelInferResponse.FromString(answer).model_name == PRIVATE
