"""The router's input check for containers that do not check inputs themselves (router/inputs.py)."""

from __future__ import annotations

import numpy as np
import pytest
from tritonclient.grpc import service_pb2 as kserve

from modelyard.placement.model import ModelVersion, signature_json
from modelyard.router.errors import BadRequest
from modelyard.router.inputs import check_inputs

IRIS = ModelVersion(
    "iris",
    "1",
    backend="mlserver",
    signature=signature_json((("INPUT", "FP32", (-1, 4)),), (("predict", "INT64", (-1,)),), False),
)


def request(
    rows: np.ndarray, *, name: str = "INPUT", datatype: str = "FP32", shape: list[int] | None = None
) -> bytes:
    req = kserve.ModelInferRequest(model_name="iris")
    req.inputs.add(name=name, datatype=datatype, shape=list(rows.shape) if shape is None else shape)
    req.raw_input_contents.append(rows.tobytes())
    return bytes(req.SerializeToString())


def test_a_request_that_matches_the_signature_passes() -> None:
    check_inputs(IRIS, request(np.ones((3, 4), np.float32)))  # any number of rows: -1
    assert check_inputs(IRIS, request(np.ones((1, 4), np.float32))) is None


@pytest.mark.parametrize(
    ("kwargs", "rows", "words"),
    [
        ({"name": "X"}, np.ones((2, 4), np.float32), "unknown input 'X'; its inputs are INPUT"),
        ({"datatype": "FP64"}, np.ones((2, 4), np.float64), "input 'INPUT' is FP32, not FP64"),
        ({}, np.ones((2, 3), np.float32), "has shape [2, 3]; expected [-1, 4]"),
        ({}, np.ones(4, np.float32), "has shape [4]; expected [-1, 4]"),
        ({"shape": [3, 4]}, np.ones((2, 4), np.float32), "needs 48 bytes of FP32, got 32"),
        ({"shape": [-2, 4]}, np.ones((2, 4), np.float32), "negative dimension"),
    ],
)
def test_a_request_that_does_not_match_is_invalid_argument_naming_the_input(
    kwargs: dict[str, object], rows: np.ndarray, words: str
) -> None:
    with pytest.raises(BadRequest) as caught:
        check_inputs(IRIS, request(rows, **kwargs))  # type: ignore[arg-type]
    assert caught.value.code.name == "INVALID_ARGUMENT"
    assert "model 'iris' version '1'" in str(caught.value) and words in str(caught.value)


def test_a_missing_input_and_a_repeated_one_are_refused() -> None:
    empty = kserve.ModelInferRequest(model_name="iris").SerializeToString()
    with pytest.raises(BadRequest, match="missing input 'INPUT'"):
        check_inputs(IRIS, empty)
    twice = kserve.ModelInferRequest(model_name="iris")
    for _ in range(2):
        twice.inputs.add(name="INPUT", datatype="FP32", shape=[1, 4])
    with pytest.raises(BadRequest, match="given twice"):
        check_inputs(IRIS, twice.SerializeToString())


def test_triton_models_and_versions_without_a_stored_signature_are_left_to_the_container() -> None:
    wrong = request(np.ones((2, 3), np.float32), name="X")
    check_inputs(ModelVersion("iris", "1", backend="triton", signature=IRIS.signature), wrong)
    check_inputs(ModelVersion("iris", "0", backend="mlserver"), wrong)  # registered before signatures
