"""What a client sees of a Triton model version kept under its internal name, and stream error codes."""

from __future__ import annotations

import grpc
import pytest
from tritonclient.grpc import service_pb2 as kserve

from modelyard.placement.model import ModelVersion
from modelyard.router.errors import ContainerStreamError, stream_error_code
from modelyard.router.public_names import public_error, public_response, public_stream_response
from modelyard.router.wire import stream_error

ON_TRITON = ModelVersion("scale", "2", backend="triton")
ON_CUSTOM = ModelVersion("scale", "2", backend="custom")
KSERVE = "/inference.GRPCInferenceService/"


def test_infer_metadata_config_and_statistics_answers_show_the_public_name() -> None:
    infer = kserve.ModelInferResponse(model_name="scale@2", model_version="2", raw_output_contents=[b"x" * 9])
    got = kserve.ModelInferResponse.FromString(
        public_response(ON_TRITON, KSERVE + "ModelInfer", infer.SerializeToString())
    )
    assert (got.model_name, got.model_version, got.raw_output_contents) == ("scale", "2", [b"x" * 9])
    metadata = kserve.ModelMetadataResponse(name="scale@2", versions=["2"])
    got_metadata = kserve.ModelMetadataResponse.FromString(
        public_response(ON_TRITON, KSERVE + "ModelMetadata", metadata.SerializeToString())
    )
    assert (got_metadata.name, list(got_metadata.versions)) == ("scale", ["2"])
    config = kserve.ModelConfigResponse()
    config.config.name = "scale@2"
    config.config.max_batch_size = 8
    got_config = kserve.ModelConfigResponse.FromString(
        public_response(ON_TRITON, KSERVE + "ModelConfig", config.SerializeToString())
    )
    assert (got_config.config.name, got_config.config.max_batch_size) == ("scale", 8)
    stats = kserve.ModelStatisticsResponse()
    stats.model_stats.add(name="scale@2", version="2", inference_count=5)
    got_stats = kserve.ModelStatisticsResponse.FromString(
        public_response(ON_TRITON, KSERVE + "ModelStatistics", stats.SerializeToString())
    )
    assert [(s.name, s.version, s.inference_count) for s in got_stats.model_stats] == [("scale", "2", 5)]


def test_answers_from_other_containers_pass_untouched() -> None:
    infer = kserve.ModelInferResponse(model_name="scale", model_version="2").SerializeToString()
    assert public_response(ON_CUSTOM, KSERVE + "ModelInfer", infer) is infer
    envelope = kserve.ModelStreamInferResponse(infer_response=kserve.ModelInferResponse()).SerializeToString()
    assert public_stream_response(ON_CUSTOM, envelope) is envelope


def test_stream_responses_show_the_public_name_and_errors_stay_errors() -> None:
    inner = kserve.ModelInferResponse(model_name="scale@2", model_version="2", id="a")
    envelope = kserve.ModelStreamInferResponse(infer_response=inner).SerializeToString()
    got = kserve.ModelStreamInferResponse.FromString(public_stream_response(ON_TRITON, envelope))
    assert (got.error_message, got.infer_response.model_name, got.infer_response.id) == ("", "scale", "a")
    error = stream_error("unexpected inference input 'X' for model 'scale@2'")
    assert public_stream_response(ON_TRITON, error) == error
    assert not kserve.ModelStreamInferResponse.FromString(error).HasField("infer_response")


@pytest.mark.parametrize(
    "message, code",
    [
        ("Request for unknown model: 'nope' is not found", grpc.StatusCode.NOT_FOUND),
        ("model 'lin' version '3' is not loaded", grpc.StatusCode.NOT_FOUND),
        ("unexpected inference input 'BAD' for model 'stream@1'", grpc.StatusCode.INVALID_ARGUMENT),
        ("expected 2 inputs but got 1 inputs for model 'add_sub@1'", grpc.StatusCode.INVALID_ARGUMENT),
        ("input byte size mismatch for input 'INPUT' for model 'scale@1'", grpc.StatusCode.INVALID_ARGUMENT),
        ("Request for unknown model: 'x' has no available versions", grpc.StatusCode.NOT_FOUND),
        ("Exceeds maximum queue size", grpc.StatusCode.UNAVAILABLE),
        ("Request timeout expired", grpc.StatusCode.DEADLINE_EXCEEDED),
        ("Traceback: ZeroDivisionError in model.py", grpc.StatusCode.UNKNOWN),
    ],
)
def test_a_container_s_in_stream_error_gets_the_code_of_its_cause(
    message: str, code: grpc.StatusCode
) -> None:
    assert stream_error_code(message) == code
    assert ContainerStreamError(message).code == code


def test_a_containers_error_names_the_public_model_and_the_callers_request_id() -> None:
    said = "[request id: 17] inference input 'INPUT' data-type is 'INT32', but model 'scale@2' expects 'FP32'"
    assert public_error(ON_TRITON, said, "17", "mine") == (
        "[request id: mine] inference input 'INPUT' data-type is 'INT32', but model 'scale' version '2' "
        "expects 'FP32'"
    )
    assert public_error(ON_TRITON, said, "17", "").startswith("inference input")  # the caller sent no id
    assert public_error(ON_TRITON, said, "18", "mine").startswith("[request id: 17]")  # not ours: kept
    assert public_error(ON_TRITON, "Model scale@2 is not ready") == "Model scale version 2 is not ready"
    assert public_error(ON_CUSTOM, "model 'scale@2' is odd") == "model 'scale@2' is odd"  # its own words
