"""The REST edge's conversions (router/rest.py), without servers: JSON and binary tensors to KServe v2
messages and back, the call context the gRPC handlers see, and the status mapping."""

from __future__ import annotations

import asyncio
import json

import grpc
import numpy as np
import pytest
from aiohttp.test_utils import make_mocked_request
from tritonclient.grpc import service_pb2 as kserve
from tritonclient.utils import deserialize_bytes_tensor

from modelyard.router.rest import (
    HTTP_STATUS,
    HttpCallContext,
    OutputFormat,
    RestError,
    _Aborted,
    infer_request,
    infer_response,
)


def test_json_tensors_become_raw_contents_in_input_order() -> None:
    header = {
        "id": "r1",
        "parameters": {"sequence_id": 7, "sequence_start": True, "binary_data_output": True},
        "inputs": [
            {"name": "A", "shape": [2, 2], "datatype": "INT32", "data": [[1, 2], [3, 4]]},
            {"name": "S", "shape": [2], "datatype": "BYTES", "data": ["héllo", "x"]},
            {"name": "H", "shape": [1], "datatype": "BF16", "data": [1.5]},
        ],
    }
    request, fmt = infer_request(header, b"", "m", "3")
    assert (request.model_name, request.model_version, request.id) == ("m", "3", "r1")
    assert request.parameters["sequence_id"].int64_param == 7
    assert request.parameters["sequence_start"].bool_param is True
    assert "binary_data_output" not in request.parameters and fmt.all_binary
    assert np.frombuffer(request.raw_input_contents[0], dtype=np.int32).tolist() == [1, 2, 3, 4]
    assert list(deserialize_bytes_tensor(request.raw_input_contents[1])) == ["héllo".encode(), b"x"]
    assert (
        request.raw_input_contents[2]
        == np.array([1.5], np.float32).view(np.uint32).astype("<u4").tobytes()[2:]
    )


def test_binary_inputs_are_cut_from_the_body_after_the_json() -> None:
    a, b = np.arange(3, dtype=np.float32).tobytes(), np.arange(2, dtype=np.int64).tobytes()
    header = {
        "inputs": [
            {"name": "A", "shape": [3], "datatype": "FP32", "parameters": {"binary_data_size": len(a)}},
            {"name": "B", "shape": [2], "datatype": "INT64", "parameters": {"binary_data_size": len(b)}},
        ],
        "outputs": [{"name": "Y", "parameters": {"binary_data": True}}, {"name": "Z"}],
    }
    request, fmt = infer_request(header, a + b, "m", "")
    assert list(request.raw_input_contents) == [a, b]
    assert [o.name for o in request.outputs] == ["Y", "Z"]
    assert fmt.is_binary("Y") and not fmt.is_binary("Z")
    with pytest.raises(RestError, match="belong to no input"):
        infer_request(header, a + b + b"extra", "m", "")


def test_outputs_come_back_as_json_or_binary_as_asked() -> None:
    response = kserve.ModelInferResponse(model_name="m", model_version="1", id="r1")
    response.outputs.add(name="Y", datatype="FP32", shape=[2])
    response.outputs.add(name="Z", datatype="INT8", shape=[3])
    response.raw_output_contents.extend([np.array([1.5, -2], np.float32).tobytes(), bytes([1, 2, 255])])
    body, length = infer_response(response, OutputFormat(binary={"Y": True}))
    assert length is not None
    answer = json.loads(body[:length])
    assert answer["outputs"][0] == {
        "name": "Y",
        "datatype": "FP32",
        "shape": [2],
        "parameters": {"binary_data_size": 8},
    }
    assert answer["outputs"][1]["data"] == [1, 2, -1]
    assert body[length:] == np.array([1.5, -2], np.float32).tobytes()
    body, length = infer_response(response, OutputFormat())
    assert length is None and json.loads(body)["outputs"][0]["data"] == [1.5, -2.0]


@pytest.mark.parametrize(
    "item, message",
    [
        ({"name": "A", "shape": [2], "datatype": "FP32", "data": [1]}, "1 values for shape [2]"),
        ({"name": "A", "shape": [1], "datatype": "NOPE", "data": [1]}, "unknown datatype 'NOPE'"),
        ({"name": "A", "shape": [-1], "datatype": "FP32", "data": [1]}, "shape must be a list of sizes"),
        ({"name": "A", "shape": [1], "datatype": "FP32"}, "neither data nor binary_data_size"),
        ({"shape": [1], "datatype": "FP32", "data": [1]}, "each input needs a name"),
        ({"name": "A", "shape": [1], "datatype": "BYTES", "data": [3]}, "BYTES data must be strings"),
    ],
)
def test_a_bad_input_is_a_bad_request_naming_it(item: dict, message: str) -> None:
    with pytest.raises(RestError, match=message.replace("[", r"\[").replace("]", r"\]")) as refused:
        infer_request({"inputs": [item]}, b"", "m", "")
    assert refused.value.status == 400


def test_the_call_context_carries_only_credentials_and_turns_pushback_into_retry_after() -> None:
    request = make_mocked_request(
        "POST", "/v2/models/m/infer",
        headers={"Authorization": "Bearer t", "x-tenant-id": "acme", "Host": "h", "Content-Length": "2"},
    )  # fmt: skip
    context = HttpCallContext(request)
    assert dict(context.invocation_metadata()) == {"authorization": "Bearer t", "x-tenant-id": "acme"}
    assert context.auth_context() == {} and context.time_remaining() is None
    context.set_trailing_metadata((("grpc-retry-pushback-ms", "1500"),))
    with pytest.raises(_Aborted) as aborted:
        asyncio.run(context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, "over the limit"))
    assert aborted.value.headers == {"Retry-After": "2"}
    assert HTTP_STATUS[aborted.value.code] == 429
    fresh = HttpCallContext(request)  # pushback given with the abort itself, as grpc.aio allows
    with pytest.raises(_Aborted) as aborted:
        asyncio.run(
            fresh.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, "over", (("grpc-retry-pushback-ms", "200"),))
        )
    assert aborted.value.headers == {"Retry-After": "1"}
