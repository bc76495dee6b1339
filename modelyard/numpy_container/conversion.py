"""Converting between KServe v2 protobuf messages and numpy for our container: inputs decoded against a
model's signature, outputs encoded, metadata, config and statistics messages."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
from tritonclient.grpc import model_config_pb2 as config_pb2
from tritonclient.grpc import service_pb2 as pb

from modelyard.datatypes import CONTENTS_FIELD, DTYPES
from modelyard.errors import BadRequest
from modelyard.numpy_container.hosting import LoadedVersion
from modelyard.numpy_container.numpy_model import (
    NumpyModel,
    TensorSpec,
)


def decode_inputs(request: Any, model: NumpyModel) -> dict[str, np.ndarray]:
    """The request's input tensors as arrays over the request's bytes (np.frombuffer, no copy)."""
    raw = request.raw_input_contents
    if raw and len(raw) != len(request.inputs):
        raise BadRequest(f"{len(request.inputs)} inputs but {len(raw)} raw_input_contents")
    arrays: dict[str, np.ndarray] = {}
    for i, tensor in enumerate(request.inputs):
        spec = model.input_spec(tensor.name)
        if spec is None:
            known = ", ".join(s.name for s in model.inputs)
            raise BadRequest(f"unexpected input '{tensor.name}' (the model takes {known})")
        if tensor.name in arrays:
            raise BadRequest(f"input '{tensor.name}' is given twice")
        if tensor.datatype != spec.datatype:
            raise BadRequest(f"input '{tensor.name}' is {tensor.datatype}, the model takes {spec.datatype}")
        shape = tuple(tensor.shape)
        if any(d < 0 for d in shape):
            raise BadRequest(f"input '{tensor.name}' has a negative dimension in shape {list(shape)}")
        count = math.prod(shape)
        dtype = DTYPES[spec.datatype]
        if raw:
            data = raw[i]
            if len(data) != count * dtype.itemsize:
                raise BadRequest(
                    f"input '{tensor.name}' has {len(data)} bytes; shape {list(shape)} of "
                    f"{spec.datatype} needs {count * dtype.itemsize}"
                )
            arrays[tensor.name] = np.frombuffer(data, dtype=dtype).reshape(shape)
            continue
        field = CONTENTS_FIELD.get(spec.datatype)
        if field is None:
            raise BadRequest(f"input '{tensor.name}' ({spec.datatype}) must come in raw_input_contents")
        values = getattr(tensor.contents, field)
        if len(values) != count:
            raise BadRequest(
                f"input '{tensor.name}' has {len(values)} values in {field}; "
                f"shape {list(shape)} needs {count}"
            )
        try:
            arrays[tensor.name] = np.fromiter(values, dtype=dtype, count=count).reshape(shape)
        except (OverflowError, ValueError) as exc:
            raise BadRequest(f"input '{tensor.name}': {exc}") from exc
    return arrays


def requested_outputs(request: Any, model: NumpyModel) -> Sequence[TensorSpec]:
    """The outputs to return: those the request names (in its order), else all of the model's."""
    if not request.outputs:
        return model.outputs
    specs = []
    for output in request.outputs:
        spec = model.output_spec(output.name)
        if spec is None:
            known = ", ".join(s.name for s in model.outputs)
            raise BadRequest(f"unknown output '{output.name}' requested (the model has {known})")
        specs.append(spec)
    return specs


def infer_response(
    loaded: LoadedVersion, request: Any, outputs: dict[str, np.ndarray], specs: Sequence[TensorSpec]
) -> Any:
    response = pb.ModelInferResponse(model_name=loaded.name, model_version=loaded.version, id=request.id)
    for spec in specs:
        array = outputs[spec.name]
        tensor = response.outputs.add()
        tensor.name = spec.name
        tensor.datatype = spec.datatype
        tensor.shape.extend(array.shape)
        response.raw_output_contents.append(array.tobytes())
    return response


def infer_one(loaded: LoadedVersion, request: Any) -> Any:
    """One request's decode, model math and encode (runs on the compute pool)."""
    inputs = decode_inputs(request, loaded.model)
    names = requested_outputs(request, loaded.model)
    return infer_response(loaded, request, loaded.model.run(inputs), names)


def tensor_metadata(specs: Sequence[TensorSpec]) -> list[Any]:
    return [
        pb.ModelMetadataResponse.TensorMetadata(name=s.name, datatype=s.datatype, shape=s.shape)
        for s in specs
    ]


def config_tensors(specs: Sequence[TensorSpec], kind: Any) -> list[Any]:
    return [
        kind(name=s.name, data_type=config_pb2.DataType.Value(f"TYPE_{s.datatype}"), dims=s.shape)
        for s in specs
    ]


def statistics_of(loaded: LoadedVersion) -> Any:
    return pb.ModelStatistics(
        name=loaded.name,
        version=loaded.version,
        last_inference=loaded.last_inference_ms,
        inference_count=loaded.inference_count,
        execution_count=loaded.execution_count,
        inference_stats=pb.InferStatistics(
            success=pb.StatisticDuration(count=loaded.success_count, ns=loaded.success_ns),
            fail=pb.StatisticDuration(count=loaded.fail_count, ns=loaded.fail_ns),
        ),
        # What this version holds in memory, as the container accounts it (agents record it as measured).
        memory_usage=[pb.MemoryUsage(type="CPU", id=0, byte_size=loaded.model.memory_bytes)],
    )


def string_parameter(parameters: Any, key: str) -> str | None:
    if key not in parameters:
        return None
    parameter = parameters[key]
    kind = parameter.WhichOneof("parameter_choice")
    if kind == "string_param":
        return str(parameter.string_param)
    if kind == "int64_param":
        return str(parameter.int64_param)
    raise BadRequest(f"parameter '{key}' must be a string")
