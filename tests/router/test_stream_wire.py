"""Reading and rewriting stream messages without decoding tensors (router/wire.py), against protobuf."""

from __future__ import annotations

import pytest
from tritonclient.grpc import service_pb2 as kserve

from modelyard.router.wire import (
    StreamResponse,
    nested,
    response_fields,
    wants_empty_final_response,
    with_stream_request_id,
)


def stream_response(*, final: bool | None, outputs: bool, request_id: str = "7") -> bytes:
    message = kserve.ModelStreamInferResponse()
    response = message.infer_response
    response.model_name, response.model_version, response.id = "m@1", "1", request_id
    if final is not None:
        response.parameters["other"].bool_param = True
        response.parameters["triton_final_response"].bool_param = final
    if outputs:
        response.outputs.add(name="OUTPUT", datatype="FP32", shape=[2])
        response.raw_output_contents.append(b"\x00" * 8)
    return bytes(message.SerializeToString())


@pytest.mark.parametrize("final", [True, False, None])
@pytest.mark.parametrize("outputs", [True, False])
def test_stream_response_reads_id_final_flag_and_outputs(final: bool | None, outputs: bool) -> None:
    info = StreamResponse(stream_response(final=final, outputs=outputs))
    assert (info.request_id, info.final, info.has_outputs, info.error) == ("7", bool(final), outputs, None)


def test_stream_response_reads_an_in_stream_error_and_its_id() -> None:
    message = kserve.ModelStreamInferResponse(error_message="bad input")
    message.infer_response.id = "9"
    info = StreamResponse(message.SerializeToString())
    assert (info.error, info.request_id, info.final) == ("bad input", "9", False)


def test_restored_fields_override_the_containers_name_and_id() -> None:
    data = stream_response(final=True, outputs=True, request_id="router-17")
    restored = kserve.ModelStreamInferResponse.FromString(data + nested(2, response_fields("m", "caller")))
    assert (restored.infer_response.model_name, restored.infer_response.id) == ("m", "caller")
    assert restored.infer_response.raw_output_contents[0] == b"\x00" * 8


@pytest.mark.parametrize("asked", [None, True, False])
def test_an_upstream_request_gets_the_routers_id_and_asks_for_the_final_response(asked: bool | None) -> None:
    request = kserve.ModelInferRequest(model_name="m", id="caller")
    request.raw_input_contents.append(b"\x01" * 16)
    if asked is not None:
        request.parameters["triton_enable_empty_final_response"].bool_param = asked
    data = request.SerializeToString()
    assert wants_empty_final_response(data) is bool(asked)
    upstream = kserve.ModelInferRequest.FromString(with_stream_request_id(data, "r5"))
    assert upstream.id == "r5"
    assert upstream.parameters["triton_enable_empty_final_response"].bool_param
    assert upstream.raw_input_contents[0] == b"\x01" * 16
