"""Checking a call's inputs against the model's registered signature, for containers that do not.

Triton and our container refuse a request whose inputs do not match the model (INVALID_ARGUMENT, naming
the input). MLServer does not: a wrong input name or datatype is accepted and its answer is garbage, and a
wrong shape comes back as INTERNAL with the framework's words. For such backends the router checks the
request's inputs against the signature stored with the model's registration (placement/model.py
`ModelVersion.signature`) before the call goes out. Only the request's header fields are decoded; the
tensor bytes are counted, never read.
"""

from __future__ import annotations

import math

from tritonclient.grpc import service_pb2 as kserve

from modelyard.datatypes import item_bytes
from modelyard.placement.model import ModelVersion, parse_signature
from modelyard.router.errors import BadRequest

CHECKED_BACKENDS = frozenset({"mlserver"})

Signature = dict[str, tuple[str, tuple[int, ...]]]
_SIGNATURES: dict[tuple[str, str], Signature] = {}  # (model key, stored signature) -> inputs, parsed once


def _inputs_of(model: ModelVersion) -> Signature | None:
    if not model.signature:
        return None  # registered before signatures were stored: the container is the only check
    cache_key = (model.key, model.signature)
    inputs = _SIGNATURES.get(cache_key)
    if inputs is None:
        declared, _, _ = parse_signature(model.signature)
        inputs = _SIGNATURES[cache_key] = {name: (datatype, shape) for name, datatype, shape in declared}
    return inputs


def check_inputs(model: ModelVersion, request: bytes) -> None:
    """Raises BadRequest (INVALID_ARGUMENT) naming the model and the input when `request` (a serialized
    ModelInferRequest) does not match the model's registered inputs."""
    if model.backend not in CHECKED_BACKENDS:
        return
    declared = _inputs_of(model)
    if declared is None:
        return
    where = f"model '{model.name}' version '{model.version}'"
    parsed = kserve.ModelInferRequest.FromString(request)
    sent = [t.name for t in parsed.inputs]
    if len(set(sent)) != len(sent):
        raise BadRequest(f"{where}: an input is given twice ({', '.join(sent)})")
    unknown = [name for name in sent if name not in declared]
    if unknown:
        raise BadRequest(f"{where}: unknown input {unknown[0]!r}; its inputs are {', '.join(declared)}")
    missing = [name for name in declared if name not in sent]
    if missing:
        raise BadRequest(f"{where}: missing input {missing[0]!r}")
    raw = parsed.raw_input_contents
    if raw and len(raw) != len(parsed.inputs):
        raise BadRequest(f"{where}: {len(parsed.inputs)} inputs but {len(raw)} raw_input_contents")
    for index, tensor in enumerate(parsed.inputs):
        datatype, shape = declared[tensor.name]
        if tensor.datatype != datatype:
            raise BadRequest(f"{where}: input {tensor.name!r} is {datatype}, not {tensor.datatype}")
        given = tuple(tensor.shape)
        if len(given) != len(shape) or any(
            want not in (-1, got) for want, got in zip(shape, given, strict=True)
        ):
            raise BadRequest(
                f"{where}: input {tensor.name!r} has shape {list(given)}; "
                f"expected {list(shape)} (-1: any size)"
            )
        if any(got < 0 for got in given):
            raise BadRequest(f"{where}: input {tensor.name!r} has a negative dimension {list(given)}")
        item = item_bytes(datatype)
        if raw and item is not None and len(raw[index]) != math.prod(given) * item:
            needed = math.prod(given) * item
            raise BadRequest(
                f"{where}: input {tensor.name!r} of shape {list(given)} needs {needed} bytes of {datatype}, "
                f"got {len(raw[index])}"
            )
