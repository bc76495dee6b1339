"""modelyard.v1 messages are wire-compatible with KServe v2's, field for field."""

from __future__ import annotations

import numpy as np
import pytest
from google.protobuf.descriptor import Descriptor
from tritonclient.grpc import service_pb2 as kserve

from modelyard.v1 import inference_pb2 as v1

PAIRS = [
    (v1.InferRequest, kserve.ModelInferRequest),
    (v1.InferResponse, kserve.ModelInferResponse),
    (v1.InputTensor, kserve.ModelInferRequest.InferInputTensor),
    (v1.RequestedOutput, kserve.ModelInferRequest.InferRequestedOutputTensor),
    (v1.OutputTensor, kserve.ModelInferResponse.InferOutputTensor),
    (v1.TensorContents, kserve.InferTensorContents),
    (v1.Parameter, kserve.InferParameter),
]


def fields(descriptor: Descriptor) -> dict[int, tuple[int, bool]]:
    return {f.number: (f.type, f.is_repeated) for f in descriptor.fields}


@pytest.mark.parametrize("ours, theirs", PAIRS, ids=[p[0].DESCRIPTOR.name for p in PAIRS])
def test_every_field_matches_kserve_number_type_and_cardinality(ours, theirs) -> None:  # type: ignore[no-untyped-def]
    assert fields(ours.DESCRIPTOR) == fields(theirs.DESCRIPTOR)


def test_a_kserve_request_parses_as_ours_and_back_unchanged() -> None:
    request = kserve.ModelInferRequest(model_name="m", model_version="2", id="r1")
    request.parameters["sequence_id"].int64_param = 42
    tensor = request.inputs.add(name="INPUT", datatype="FP32", shape=[2, 3])
    tensor.parameters["binary_data_size"].int64_param = 24
    request.outputs.add(name="OUTPUT").parameters["binary_data"].bool_param = True
    request.raw_input_contents.append(np.arange(6, dtype=np.float32).tobytes())
    wire = request.SerializeToString()

    ours = v1.InferRequest.FromString(wire)
    assert ours.model_name == "m" and ours.parameters["sequence_id"].int64_param == 42
    assert list(ours.inputs[0].shape) == [2, 3]
    assert kserve.ModelInferRequest.FromString(ours.SerializeToString()) == request
