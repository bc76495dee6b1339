"""Forwarding KServe v2 calls to SageMaker multi-model containers over their HTTP contract.

Triton and our container take the caller's bytes as they came; a SageMaker container takes
`POST /models/{name}/invoke` with a body its handler decodes. The payload is one documented content type:

    request:  Content-Type: application/x-npy   the one input tensor as a .npy file (C order)
    response: Accept: application/x-npy         the one output tensor as a .npy file
                                                (application/json also read: a JSON array),
                                                cast to the signature's datatype within its kind
                                                (float64 -> FP32 yes, float -> INT32 no: INTERNAL)

`application/x-npy` is what sagemaker-inference's default `input_fn`/`output_fn` decode and encode, so a
model's `inference.py` needs only `model_fn` and `predict_fn`; and the tensor's raw bytes become the body
behind a ~128-byte header, without decoding them. So these models take one input and give one output
(checked at upload); the tensor names are the signature's (the registration's; a version registered
before signatures were stored has its artifact's manifest.json read, once). BYTES tensors are refused:
a .npy of strings is a pickle.

Errors become the status codes the rest of the router knows (one table, `status_for`): no connection ->
UNAVAILABLE (the router's failover resends it), 404 from a copy listed ready -> NOT_FOUND (resent as a
stale copy is), 507 -> RESOURCE_EXHAUSTED, other 4xx -> INVALID_ARGUMENT and 5xx -> INTERNAL with the
handler's own message, 503 (MMS: no worker free) -> UNAVAILABLE, too slow -> DEADLINE_EXCEEDED.

ModelMetadata is answered from the signature; ModelReady asks the container (`GET /models/{name}`);
ModelConfig and ModelStatistics, and streams, answer UNIMPLEMENTED: the contract has nothing to map them to.
"""

from __future__ import annotations

import asyncio
import io
import json
import math
from typing import Any

import aiohttp
import grpc
import grpc.aio
import numpy as np
from tritonclient.grpc import service_pb2 as kserve

from modelyard.containers.sagemaker.adapter import container_model_name, error_message, new_session
from modelyard.datatypes import CONTENTS_FIELD, DTYPES
from modelyard.errors import FailedPrecondition, Unimplemented
from modelyard.placement.model import Container, ModelVersion
from modelyard.placement.pipeline import ModelSignature
from modelyard.router.errors import BadRequest

NPY = "application/x-npy"
_KSERVE = "/inference.GRPCInferenceService/"

_DATATYPES = {(dtype.kind, dtype.itemsize): name for name, dtype in DTYPES.items()}


class SignatureUnavailable(FailedPrecondition):
    """A SageMaker model's signature cannot be read, so its tensors cannot be converted."""


def upstream_error(code: grpc.StatusCode, details: str) -> grpc.aio.AioRpcError:
    """A container's failure as the gRPC error a Triton copy would raise: the router's failover and its
    one status mapping (router/handlers.py) then treat it alike."""
    return grpc.aio.AioRpcError(code, grpc.aio.Metadata(), grpc.aio.Metadata(), details=details)


def status_for(http_status: int) -> grpc.StatusCode:
    """The one table from a contract server's HTTP status to a gRPC status."""
    if http_status == 404:
        return grpc.StatusCode.NOT_FOUND
    if http_status == 507:
        return grpc.StatusCode.RESOURCE_EXHAUSTED
    if http_status == 503:
        return grpc.StatusCode.UNAVAILABLE
    if http_status in (408, 504):
        return grpc.StatusCode.DEADLINE_EXCEEDED
    if 400 <= http_status < 500:
        return grpc.StatusCode.INVALID_ARGUMENT
    return grpc.StatusCode.INTERNAL


def reject_stream(model: ModelVersion) -> None:
    """Streams to a SageMaker model: UNIMPLEMENTED, said plainly (the contract has no streaming)."""
    if model.backend == "sagemaker":
        raise Unimplemented(
            f"model '{model.name}' is served by a SageMaker container, which has no streaming; "
            "call ModelInfer (or Infer) instead"
        )


def npy_body(datatype: str, shape: list[int], data: bytes) -> bytes:
    """A .npy file holding `data` (raw little-endian, C order) as an array of `shape`."""
    header = io.BytesIO()
    descr = {"descr": np.lib.format.dtype_to_descr(DTYPES[datatype]), "fortran_order": False}
    np.lib.format.write_array_header_1_0(header, {**descr, "shape": tuple(shape)})
    return header.getvalue() + data


def read_npy(body: bytes) -> tuple[str, list[int], bytes]:
    """(datatype, shape, raw little-endian bytes) of a .npy answer; ValueError if it is not one we take."""
    stream = io.BytesIO(body)
    version = np.lib.format.read_magic(stream)
    if version == (1, 0):
        shape, fortran, dtype = np.lib.format.read_array_header_1_0(stream)
    elif version == (2, 0):
        shape, fortran, dtype = np.lib.format.read_array_header_2_0(stream)
    else:
        raise ValueError(f".npy version {version} not supported")
    datatype = _DATATYPES.get((dtype.kind, dtype.itemsize))
    if datatype is None or dtype.hasobject:
        raise ValueError(f"dtype {dtype} has no KServe datatype")
    data = body[stream.tell() :]
    if len(data) != math.prod(shape) * dtype.itemsize:
        raise ValueError(f"{len(data)} data bytes for shape {list(shape)} of {dtype}")
    if fortran or dtype.byteorder == ">":
        array = np.frombuffer(data, dtype=dtype).reshape(shape, order="F" if fortran else "C")
        data = np.ascontiguousarray(array, dtype=DTYPES[datatype]).tobytes()
    return datatype, list(shape), data


class SageMakerForwarder:
    """The router's one pooled HTTP client to SageMaker containers, and the conversions."""

    def __init__(self) -> None:
        self._session: aiohttp.ClientSession | None = None
        self._signatures: dict[str, ModelSignature] = {}

    @property
    def session(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = new_session(limit=0)  # keep-alive, no cap: the router bounds nothing else
        return self._session

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def signature(self, model: ModelVersion) -> ModelSignature:
        """The version's signature: its registration's, or (registered before signatures were stored) its
        artifact's manifest.json, read once (artifacts are immutable)."""
        cached = self._signatures.get(model.key)
        if cached is not None and cached.key == model.key:
            return cached
        from modelyard.catalog.pipelines import read_signature

        try:
            signature = await asyncio.to_thread(read_signature, model)
        except Exception as exc:  # ArchiveError, OSError: the artifact is not readable from here
            raise SignatureUnavailable(
                f"model '{model.name}' version '{model.version}': cannot read its signature ({exc})"
            ) from exc
        self._signatures[model.key] = signature
        return signature

    async def unary(
        self, model: ModelVersion, container: Container, method: str, request: bytes, timeout_s: float
    ) -> bytes:
        if method.endswith("/ModelInfer"):
            return await self.infer(model, container, request, timeout_s)
        if method.endswith("/ModelMetadata"):
            return await self.metadata(model)
        if method.endswith("/ModelReady"):
            return await self.ready(model, container, timeout_s)
        name = method.rsplit("/", 1)[-1]
        raise Unimplemented(
            f"{name} is not available for model '{model.name}' (served by a SageMaker container)"
        )

    async def metadata(self, model: ModelVersion) -> bytes:
        signature = await self.signature(model)
        answer = kserve.ModelMetadataResponse(name=model.name, versions=[model.version], platform="sagemaker")
        for name, (datatype, shape) in signature.inputs.items():
            answer.inputs.add(name=name, datatype=datatype, shape=list(shape))
        for name, (datatype, shape) in signature.outputs.items():
            answer.outputs.add(name=name, datatype=datatype, shape=list(shape))
        return bytes(answer.SerializeToString())

    async def ready(self, model: ModelVersion, container: Container, timeout_s: float) -> bytes:
        name = container_model_name(model.name, model.version)
        status, _, _ = await self._send(container, "GET", f"/models/{name}", None, {}, timeout_s)
        return bytes(kserve.ModelReadyResponse(ready=status == 200).SerializeToString())

    async def infer(
        self, model: ModelVersion, container: Container, request: bytes, timeout_s: float
    ) -> bytes:
        try:
            message = kserve.ModelInferRequest.FromString(request)
        except Exception as exc:  # protobuf's DecodeError
            raise _invalid(f"malformed ModelInferRequest: {exc}") from exc
        signature = await self.signature(model)
        if len(signature.inputs) != 1 or len(signature.outputs) != 1:
            raise SignatureUnavailable(
                f"model '{model.name}' version '{model.version}': a SageMaker model takes one input and "
                f"gives one output; its signature has {len(signature.inputs)} and {len(signature.outputs)}"
            )
        ((input_name, (input_type, _)),) = signature.inputs.items()
        output_name = next(iter(signature.outputs))
        body = self._request_body(model, message, input_name, input_type)
        for wanted in message.outputs:
            if wanted.name != output_name:
                raise _invalid(
                    f"unexpected output '{wanted.name}' (model '{model.name}' gives {output_name})"
                )
        name = container_model_name(model.name, model.version)
        headers = {"Content-Type": NPY, "Accept": NPY}
        status, content_type, answer = await self._send(
            container, "POST", f"/models/{name}/invoke", body, headers, timeout_s
        )
        if status != 200:
            details = error_message(answer) or f"HTTP {status}"
            raise upstream_error(
                status_for(status), f"model '{model.name}' version '{model.version}': {details}"
            )
        try:
            datatype, shape, data = self._response_tensor(content_type, answer, signature, output_name)
        except ValueError as exc:
            raise upstream_error(
                grpc.StatusCode.INTERNAL,
                f"model '{model.name}' version '{model.version}': its answer is not a tensor: {exc}",
            ) from exc
        response = kserve.ModelInferResponse(
            model_name=model.name, model_version=model.version, id=message.id
        )
        response.outputs.add(name=output_name, datatype=datatype, shape=shape)
        response.raw_output_contents.append(data)
        return bytes(response.SerializeToString())

    @staticmethod
    def _request_body(model: ModelVersion, message: Any, input_name: str, input_type: str) -> bytes:
        if len(message.inputs) != 1:
            raise _invalid(
                f"model '{model.name}' takes one input ({input_name}), the request has {len(message.inputs)}"
            )
        tensor = message.inputs[0]
        if tensor.name != input_name:
            raise _invalid(f"unexpected input '{tensor.name}' (model '{model.name}' takes {input_name})")
        if tensor.datatype != input_type:
            raise _invalid(f"input '{tensor.name}' is {tensor.datatype}, the model takes {input_type}")
        if tensor.datatype not in DTYPES:
            raise _invalid(f"input '{tensor.name}': datatype {tensor.datatype} cannot travel as .npy")
        shape = list(tensor.shape)
        if any(d < 0 for d in shape):
            raise _invalid(f"input '{tensor.name}' has a negative dimension in shape {shape}")
        dtype = DTYPES[tensor.datatype]
        expected = math.prod(shape) * dtype.itemsize
        if message.raw_input_contents:
            if len(message.raw_input_contents) != 1:
                raise _invalid(f"1 input but {len(message.raw_input_contents)} raw_input_contents")
            data = message.raw_input_contents[0]
        else:
            field = CONTENTS_FIELD.get(tensor.datatype)
            values = getattr(tensor.contents, field) if field else []
            data = np.asarray(values, dtype=dtype).tobytes()
        if len(data) != expected:
            raise _invalid(
                f"input '{tensor.name}': {len(data)} bytes of data for shape {shape} "
                f"({tensor.datatype}: {expected} bytes)"
            )
        return npy_body(tensor.datatype, shape, data)

    @staticmethod
    def _response_tensor(
        content_type: str, answer: bytes, signature: ModelSignature, output_name: str
    ) -> tuple[str, list[int], bytes]:
        declared = signature.outputs.get(output_name, ("FP32", ()))[0]
        if declared not in DTYPES:
            raise ValueError(f"output datatype {declared} cannot travel as .npy or JSON")
        if content_type.startswith(NPY):
            datatype, shape, data = read_npy(answer)
            if datatype == declared:
                return datatype, shape, data
            # numpy code often answers float64 for a float32 model: cast within the kind, as declared
            array = np.frombuffer(data, dtype=DTYPES[datatype])
            if not np.can_cast(array.dtype, DTYPES[declared], casting="same_kind"):
                raise ValueError(f"the model answered {datatype}, its signature says {declared}")
            return declared, shape, array.astype(DTYPES[declared]).tobytes()
        if content_type.startswith("application/json"):
            array = np.asarray(json.loads(answer), dtype=DTYPES[declared])
            return declared, list(array.shape), array.tobytes()
        raise ValueError(f"content type {content_type or 'none'} (expected {NPY})")

    async def _send(
        self,
        container: Container,
        method: str,
        path: str,
        body: bytes | None,
        headers: dict[str, str],
        timeout_s: float,
    ) -> tuple[int, str, bytes]:
        url = f"http://{container.address}{path}"
        try:
            async with self.session.request(
                method, url, data=body, headers=headers, timeout=aiohttp.ClientTimeout(total=timeout_s)
            ) as response:
                return response.status, response.headers.get("Content-Type", ""), await response.read()
        except TimeoutError as exc:
            raise upstream_error(
                grpc.StatusCode.DEADLINE_EXCEEDED, f"container {container.id} did not answer in time"
            ) from exc
        except (aiohttp.ClientConnectionError, OSError) as exc:
            # Refused, reset or closed: the copy is unreachable; the router tries another or waits.
            raise upstream_error(
                grpc.StatusCode.UNAVAILABLE, f"container {container.id} unreachable: {exc}"
            ) from exc


def _invalid(details: str) -> BadRequest:
    return BadRequest(details)
