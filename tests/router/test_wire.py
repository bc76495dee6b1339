"""Reading model name and version from request bytes without decoding them."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st
from tritonclient.grpc import service_pb2 as kserve

from modelyard.router.wire import (
    WireError,
    name_version_fields,
    read_name_version,
    stream_error,
    with_bool_parameter,
    with_name,
    with_nested_name,
    with_version,
)

names = st.text(min_size=0, max_size=40)
tensors = st.lists(st.binary(max_size=300), max_size=4)


def request(name: str, version: str, raw: list[bytes], request_id: str = "") -> kserve.ModelInferRequest:
    message = kserve.ModelInferRequest(model_name=name, model_version=version, id=request_id)
    for i, data in enumerate(raw):
        tensor = message.inputs.add(name=f"INPUT{i}", datatype="UINT8", shape=[len(data)])
        tensor.parameters["p"].int64_param = i
        message.raw_input_contents.append(data)
    message.parameters["priority"].int64_param = 3
    message.parameters["weight"].double_param = 0.5
    return message


@given(names, names, tensors, names)
def test_reads_the_name_and_version_protobuf_would_decode(name: str, version: str, raw, request_id) -> None:  # type: ignore[no-untyped-def]
    data = request(name, version, raw, request_id).SerializeToString()
    assert read_name_version(data) == (name, version)


@given(names, names, names, tensors)
def test_with_version_sets_the_version_and_keeps_everything_else(name, version, new_version, raw) -> None:  # type: ignore[no-untyped-def]
    original = request(name, version, raw)
    patched = kserve.ModelInferRequest.FromString(with_version(original.SerializeToString(), new_version))
    assert patched.model_version == new_version
    patched.model_version = version
    assert patched == original


@given(st.binary(max_size=64))
def test_arbitrary_bytes_give_a_result_or_wire_error(data: bytes) -> None:
    try:
        name, version = read_name_version(data)
    except WireError:
        return
    # Whatever we accept, protobuf accepts too and reads the same name.
    try:
        parsed = kserve.ModelInferRequest.FromString(data)
    except Exception:
        return  # protobuf is stricter about nested fields we deliberately do not look into
    assert (parsed.model_name, parsed.model_version) == (name, version)


@pytest.mark.parametrize(
    "data",
    [b"\x0a\x05ab", b"\x0a", b"\x0a\x80", b"\x07", b"\x0a\x02\xff\xfe", b"\x00\x01"],
    ids=["truncated-string", "missing-length", "truncated-varint", "wire-type-7", "not-utf8", "field-0"],
)
def test_malformed_messages_raise_wire_error(data: bytes) -> None:
    with pytest.raises(WireError):
        read_name_version(data)


def test_large_tensors_are_skipped_not_copied() -> None:
    data = request("big", "3", [bytes(16 * 1024 * 1024)]).SerializeToString()
    assert read_name_version(data) == ("big", "3")


@given(names, st.booleans(), st.lists(st.tuples(names, st.booleans()), max_size=3))
def test_with_bool_parameter_sets_the_parameter_protobuf_reads(key: str, value: bool, others) -> None:  # type: ignore[no-untyped-def]
    message = kserve.ModelInferRequest(model_name="m")
    for other_key, other_value in others:
        message.parameters[other_key].bool_param = other_value
    parsed = kserve.ModelInferRequest.FromString(with_bool_parameter(message.SerializeToString(), key, value))
    assert parsed.parameters[key].bool_param is value
    assert parsed.model_name == "m"


def test_stream_error_is_a_model_stream_infer_response() -> None:
    parsed = kserve.ModelStreamInferResponse.FromString(stream_error("model 'x' is not registered"))
    assert parsed.error_message == "model 'x' is not registered" and not parsed.HasField("infer_response")


@given(names, names, names, names, tensors)
def test_appended_name_version_fields_override_both_and_keep_the_tensors(
    name, version, new_name, new_version, raw
) -> None:  # type: ignore[no-untyped-def]
    original = request(name, version, raw, "id-1")
    parsed = kserve.ModelInferRequest.FromString(
        original.SerializeToString() + name_version_fields(new_name, new_version)
    )
    assert (parsed.model_name, parsed.model_version) == (new_name, new_version)
    original.model_name, original.model_version = new_name, new_version
    assert parsed == original


@given(names, names, tensors)
def test_with_name_overrides_a_response_s_model_name(name, new_name, raw) -> None:  # type: ignore[no-untyped-def]
    response = kserve.ModelInferResponse(model_name=name, model_version="4", id="r")
    response.raw_output_contents.extend(raw)
    parsed = kserve.ModelInferResponse.FromString(with_name(response.SerializeToString(), new_name))
    response.model_name = new_name
    assert parsed == response


@given(names, names, tensors)
def test_with_nested_name_merges_into_the_sub_message(name, new_name, raw) -> None:  # type: ignore[no-untyped-def]
    inner = kserve.ModelInferResponse(model_name=name, model_version="2", id="r")
    inner.raw_output_contents.extend(raw)
    inner.parameters["triton_final_response"].bool_param = True
    envelope = kserve.ModelStreamInferResponse(infer_response=inner).SerializeToString()
    parsed = kserve.ModelStreamInferResponse.FromString(with_nested_name(envelope, 2, new_name))
    inner.model_name = new_name
    assert parsed == kserve.ModelStreamInferResponse(infer_response=inner)
    config = kserve.ModelConfigResponse()
    config.config.name = name
    config.config.backend = "python"
    parsed_config = kserve.ModelConfigResponse.FromString(
        with_nested_name(config.SerializeToString(), 1, new_name)
    )
    assert (parsed_config.config.name, parsed_config.config.backend) == (new_name, "python")
