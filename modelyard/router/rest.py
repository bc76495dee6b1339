"""KServe v2 REST on the router (HTTP/JSON and the binary tensor data extension), served by aiohttp.

The REST front is an edge converter, not a second router: each HTTP request becomes its KServe v2 gRPC
message and goes to the very handlers the gRPC front registers (router/kserve.py), with a call context
carrying the caller's credentials (bearer token, x-tenant-id, the verified client certificate). Identity,
tenancy, limits, version rules, pipelines, lazy loading and the error mapping are therefore the gRPC
front's. The answer converts back to JSON; a gRPC status becomes `{"error": "..."}` with the HTTP status
of `HTTP_STATUS`.

Tensors: JSON `data` is packed into raw bytes here (the edge is the one place tensors are decoded);
binary tensors (`parameters.binary_data_size`, after `Inference-Header-Content-Length` bytes of JSON)
pass through as they came. Outputs come back as JSON, or as binary when asked (`binary_data` per output,
`binary_data_output` for all).
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import ssl
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import grpc
import numpy as np
from aiohttp import web
from google.protobuf import json_format
from tritonclient.grpc import service_pb2 as kserve

from modelyard.fleet_secret import FLEET_SECRET_HEADER
from modelyard.router.admission import PUSHBACK_TRAILER
from modelyard.router.identity import AUTHORIZATION_HEADER, TENANT_HEADER
from modelyard.router.kserve import SERVICE, kserve_handler
from modelyard.router.routing import Router

log = logging.getLogger(__name__)

HEADER_LENGTH = "Inference-Header-Content-Length"
# Headers that travel from HTTP into the call's metadata: credentials and trace context. Nothing else
# (Host, Content-Length, ...) means anything to a gRPC hop.
_METADATA_HEADERS = (AUTHORIZATION_HEADER, TENANT_HEADER, FLEET_SECRET_HEADER, "traceparent", "tracestate")
# JSON bodies above this are parsed off the event loop (json.loads of megabytes takes milliseconds).
_PARSE_INLINE_BYTES = 256 * 1024
HTTP_STATUS = {
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.FAILED_PRECONDITION: 400,
    grpc.StatusCode.OUT_OF_RANGE: 400,
    grpc.StatusCode.UNAUTHENTICATED: 401,
    grpc.StatusCode.PERMISSION_DENIED: 403,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.ABORTED: 409,
    grpc.StatusCode.ALREADY_EXISTS: 409,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
    grpc.StatusCode.CANCELLED: 499,
    grpc.StatusCode.UNIMPLEMENTED: 501,
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504,
}


class RestError(Exception):
    """A request refused at the HTTP edge, before any routing."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class _Aborted(Exception):
    """What `context.abort` raises: the gRPC status the handler ended the call with."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(details)
        self.code = code
        self.details = details
        self.headers: dict[str, str] = {}


class HttpCallContext:
    """The part of grpc.aio.ServicerContext the router's handlers use, for one HTTP request."""

    def __init__(self, request: web.Request) -> None:
        headers = request.headers
        self._metadata = tuple((name, headers[name]) for name in _METADATA_HEADERS if name in headers)
        self._auth: dict[str, list[bytes]] = {}
        peer = request.transport.get_extra_info("peercert") if request.transport is not None else None
        if peer:  # only a certificate the client CA verified (ssl.CERT_REQUIRED) gets here
            self._auth = _certificate_names(peer)
        self.trailing_metadata: tuple[tuple[str, str], ...] = ()

    def invocation_metadata(self) -> tuple[tuple[str, str], ...]:
        return self._metadata

    def auth_context(self) -> dict[str, list[bytes]]:
        return self._auth

    def time_remaining(self) -> float | None:
        return None  # REST carries no deadline: the router's default applies upstream

    def cancelled(self) -> bool:
        return False

    def set_trailing_metadata(self, metadata: tuple[tuple[str, str], ...]) -> None:
        self.trailing_metadata = tuple(metadata)

    async def abort(self, code: grpc.StatusCode, details: str = "", trailing_metadata: Any = ()) -> None:
        aborted = _Aborted(code, details)
        for key, value in (*self.trailing_metadata, *(trailing_metadata or ())):
            if key == PUSHBACK_TRAILER and str(value).isdigit():  # gRPC's retry pushback, in HTTP's words
                aborted.headers["Retry-After"] = str(max(1, math.ceil(int(value) / 1000)))
        raise aborted


def _certificate_names(peer: dict[str, Any]) -> dict[str, list[bytes]]:
    """A verified client certificate's names as gRPC's auth context spells them (router/identity.py)."""
    sans = [
        value.encode() for kind, value in peer.get("subjectAltName", ()) if kind in ("DNS", "URI", "email")
    ]
    cns = [value.encode() for rdn in peer.get("subject", ()) for key, value in rdn if key == "commonName"]
    names: dict[str, list[bytes]] = {}
    if sans:
        names["x509_subject_alternative_name"] = sans
    if cns:
        names["x509_common_name"] = cns
    return names


def server_ssl_context(cert: str, key: str, client_ca: str | None) -> ssl.SSLContext:
    """TLS for the REST port from the gRPC port's files; with `client_ca`, client certificates required."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    if client_ca:
        context.load_verify_locations(client_ca)
        context.verify_mode = ssl.CERT_REQUIRED
    return context


# -- JSON <-> KServe v2 messages ------------------------------------------------------------------------


def _parameter(message: Any, key: str, value: Any, where: str) -> None:
    """One JSON parameter into a protobuf `map<string, InferParameter>`."""
    if isinstance(value, bool):
        message[key].bool_param = value
    elif isinstance(value, int):
        if not -(2**63) <= value < 2**63:
            raise RestError(400, f"{where} parameter '{key}' is out of the int64 range")
        message[key].int64_param = value
    elif isinstance(value, float):
        message[key].double_param = value
    elif isinstance(value, str):
        message[key].string_param = value
    else:
        raise RestError(400, f"{where} parameter '{key}' must be a bool, number or string, got {value!r}")


def _parameters_json(parameters: Any) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in parameters.items():
        kind = value.WhichOneof("parameter_choice")
        if kind is not None:
            out[key] = getattr(value, kind)
    return out


def _tensor_bytes(name: str, datatype: str, shape: list[int], data: Any) -> bytes:
    """A JSON tensor's `data` (nested or flat, row-major) as KServe v2 raw bytes."""
    from tritonclient.utils import serialize_byte_tensor, triton_to_np_dtype

    count = int(np.prod(shape)) if shape else 1
    try:
        if datatype == "BYTES":
            flat = np.array(data, dtype=np.object_).reshape(-1)
            values = [v.encode() if isinstance(v, str) else v for v in flat]
            if not all(isinstance(v, bytes) for v in values):
                raise RestError(400, f"input '{name}': BYTES data must be strings")
            array = np.array(values, dtype=np.object_)
            if array.size != count:
                raise ValueError(f"{array.size} values for shape {shape}")
            serialized = serialize_byte_tensor(array)
            return b"" if serialized is None else bytes(serialized.item())
        if datatype == "BF16":
            floats = np.array(data, dtype=np.float32).reshape(-1)
            if floats.size != count:
                raise ValueError(f"{floats.size} values for shape {shape}")
            return (floats.view(np.uint32) >> 16).astype("<u2").tobytes()  # bfloat16: float32's top half
        dtype = triton_to_np_dtype(datatype)
        if dtype is None:
            raise RestError(400, f"input '{name}': unknown datatype {datatype!r}")
        array = np.array(data, dtype=dtype).reshape(-1)
    except (ValueError, TypeError, OverflowError) as exc:
        raise RestError(400, f"input '{name}': data does not fit {datatype} {shape}: {exc}") from exc
    if array.size != count:
        raise RestError(400, f"input '{name}': {array.size} values for shape {shape} ({count} expected)")
    return array.tobytes()


def _output_json(datatype: str, raw: bytes) -> list[Any]:
    """Raw output bytes as the flat JSON list KServe v2 REST answers with."""
    from tritonclient.utils import deserialize_bytes_tensor, triton_to_np_dtype

    if datatype == "BYTES":
        values = deserialize_bytes_tensor(raw) if raw else []
        return [v.decode(errors="replace") if isinstance(v, bytes) else str(v) for v in values]
    if datatype == "BF16":
        halves = np.frombuffer(raw, dtype="<u2").astype(np.uint32) << 16
        bf16: list[Any] = halves.view(np.float32).tolist()
        return bf16
    dtype = triton_to_np_dtype(datatype)
    if dtype is None:
        raise RestError(500, f"container answered with unknown datatype {datatype!r}")
    flat: list[Any] = np.frombuffer(raw, dtype=dtype).tolist()
    return flat


_CONTENTS_FIELD = {
    "BOOL": "bool_contents", "INT8": "int_contents", "INT16": "int_contents", "INT32": "int_contents",
    "INT64": "int64_contents", "UINT8": "uint_contents", "UINT16": "uint_contents",
    "UINT32": "uint_contents", "UINT64": "uint64_contents", "FP32": "fp32_contents",
    "FP64": "fp64_contents", "BYTES": "bytes_contents",
}  # fmt: skip


@dataclass
class OutputFormat:
    """How the caller wants each output back: binary (by name), or every one binary."""

    binary: dict[str, bool] = field(default_factory=dict)
    all_binary: bool = False

    def is_binary(self, name: str) -> bool:
        return self.binary.get(name, self.all_binary)


def _json_object(body: bytes, what: str) -> dict[str, Any]:
    try:
        data = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise RestError(400, f"{what} is not valid JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise RestError(400, f"{what} must be a JSON object")
    return data


def infer_request(
    header: dict[str, Any], binary: bytes, name: str, version: str
) -> tuple[kserve.ModelInferRequest, OutputFormat]:
    """A KServe v2 REST infer request (its JSON header, the binary data after it) as a ModelInferRequest."""
    request = kserve.ModelInferRequest(model_name=name, model_version=version)
    request_id = header.get("id", "")
    if not isinstance(request_id, str):
        raise RestError(400, "id must be a string")
    request.id = request_id
    fmt = OutputFormat()
    parameters = header.get("parameters") or {}
    if not isinstance(parameters, dict):
        raise RestError(400, "parameters must be a JSON object")
    for key, value in parameters.items():
        if key == "binary_data_output":
            fmt.all_binary = bool(value)
            continue
        _parameter(request.parameters, key, value, "request")
    inputs = header.get("inputs")
    if not isinstance(inputs, list) or not inputs:
        raise RestError(400, "inputs must be a non-empty list")
    offset = 0
    for item in inputs:
        if not isinstance(item, dict):
            raise RestError(400, "each input must be a JSON object with name, shape, datatype and data")
        tensor_name, datatype, shape = item.get("name"), item.get("datatype"), item.get("shape")
        if not isinstance(tensor_name, str) or not tensor_name:
            raise RestError(400, "each input needs a name")
        if not isinstance(datatype, str):
            raise RestError(400, f"input '{tensor_name}': datatype must be a string")
        if not isinstance(shape, list) or not all(
            isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape
        ):
            raise RestError(400, f"input '{tensor_name}': shape must be a list of sizes")
        tensor = request.inputs.add(name=tensor_name, datatype=datatype, shape=shape)
        tensor_parameters = item.get("parameters") or {}
        if not isinstance(tensor_parameters, dict):
            raise RestError(400, f"input '{tensor_name}': parameters must be a JSON object")
        size = tensor_parameters.get("binary_data_size")
        for key, value in tensor_parameters.items():
            if key != "binary_data_size":
                _parameter(tensor.parameters, key, value, f"input '{tensor_name}'")
        if size is not None:
            if not isinstance(size, int) or isinstance(size, bool) or size < 0:
                raise RestError(400, f"input '{tensor_name}': binary_data_size must be a size in bytes")
            if offset + size > len(binary):
                raise RestError(
                    400, f"input '{tensor_name}': binary_data_size {size} runs past the end of the body"
                )
            request.raw_input_contents.append(binary[offset : offset + size])
            offset += size
        elif "data" in item:
            request.raw_input_contents.append(_tensor_bytes(tensor_name, datatype, shape, item["data"]))
        else:
            raise RestError(400, f"input '{tensor_name}' has neither data nor binary_data_size")
    if offset != len(binary):
        raise RestError(
            400, f"{len(binary) - offset} bytes of binary data after the inputs belong to no input"
        )
    outputs = header.get("outputs") or []
    if not isinstance(outputs, list):
        raise RestError(400, "outputs must be a list")
    for item in outputs:
        if not isinstance(item, dict) or not isinstance(item.get("name"), str):
            raise RestError(400, "each requested output must be a JSON object with a name")
        output = request.outputs.add(name=item["name"])
        output_parameters = item.get("parameters") or {}
        if not isinstance(output_parameters, dict):
            raise RestError(400, f"output '{item['name']}': parameters must be a JSON object")
        for key, value in output_parameters.items():
            if key == "binary_data":
                fmt.binary[item["name"]] = bool(value)
            else:
                _parameter(output.parameters, key, value, f"output '{item['name']}'")
    return request, fmt


def infer_response(response: kserve.ModelInferResponse, fmt: OutputFormat) -> tuple[bytes, int | None]:
    """The REST answer to an infer call: its body and, when binary outputs follow the JSON, its length."""
    answer: dict[str, Any] = {"model_name": response.model_name, "model_version": response.model_version}
    if response.id:
        answer["id"] = response.id
    if response.parameters:
        answer["parameters"] = _parameters_json(response.parameters)
    outputs: list[dict[str, Any]] = []
    chunks: list[bytes] = []
    raw_contents = response.raw_output_contents
    for index, output in enumerate(response.outputs):
        if index < len(raw_contents):
            raw = raw_contents[index]
        else:  # typed contents (not Triton's way, but allowed): pack them
            values = list(getattr(output.contents, _CONTENTS_FIELD.get(output.datatype, "fp32_contents")))
            raw = _tensor_bytes(output.name, output.datatype, list(output.shape), values)
        item: dict[str, Any] = {"name": output.name, "datatype": output.datatype, "shape": list(output.shape)}
        parameters = _parameters_json(output.parameters)
        if fmt.is_binary(output.name):
            parameters["binary_data_size"] = len(raw)
            chunks.append(raw)
        else:
            item["data"] = _output_json(output.datatype, raw)
        if parameters:
            item["parameters"] = parameters
        outputs.append(item)
    answer["outputs"] = outputs
    header = json.dumps(answer, separators=(",", ":")).encode()
    if not chunks:
        return header, None
    return header + b"".join(chunks), len(header)


def _metadata_json(response: kserve.ModelMetadataResponse) -> dict[str, Any]:
    def tensors(items: Any) -> list[dict[str, Any]]:
        return [{"name": t.name, "datatype": t.datatype, "shape": list(t.shape)} for t in items]

    return {
        "name": response.name,
        "versions": list(response.versions),
        "platform": response.platform,
        "inputs": tensors(response.inputs),
        "outputs": tensors(response.outputs),
    }


# -- the HTTP server -------------------------------------------------------------------------------------

Handler = Callable[[bytes, Any], Awaitable[bytes]]


@dataclass(frozen=True)
class _CallDetails:
    method: str
    invocation_metadata: tuple[tuple[str, str], ...] = ()


def _error(status: int, message: str, headers: dict[str, str] | None = None) -> web.Response:
    return web.json_response({"error": message}, status=status, headers=headers)


class RestFront:
    """KServe v2 REST endpoints on `host:port`, answered through the gRPC front's handlers."""

    def __init__(
        self,
        router: Router,
        host: str = "127.0.0.1",
        port: int = 8000,
        *,
        ssl_context: ssl.SSLContext | None = None,
        max_body_bytes: int = 64 * 1024 * 1024,
    ) -> None:
        self.router = router
        self.host = host
        self.port = port
        self.ssl_context = ssl_context
        self.max_body_bytes = max_body_bytes
        generic = kserve_handler(router)
        self._handlers: dict[str, Handler] = {}
        for method in (
            "ServerLive", "ServerReady", "ServerMetadata", "ModelReady", "ModelMetadata", "ModelConfig",
            "ModelStatistics", "ModelInfer", "RepositoryIndex",
        ):  # fmt: skip
            handler = generic.service(_CallDetails(f"/{SERVICE}/{method}"))
            assert handler is not None and handler.unary_unary is not None, method
            self._handlers[method] = handler.unary_unary
        self._runner: web.AppRunner | None = None

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def application(self) -> web.Application:
        app = web.Application(client_max_size=self.max_body_bytes, middlewares=[self._errors])
        model = "/v2/models/{name}"
        versioned = "/v2/models/{name}/versions/{version}"
        app.router.add_get("/v2/health/live", self.live)
        app.router.add_get("/v2/health/ready", self.ready)
        app.router.add_get("/v2", self.server_metadata)
        app.router.add_post("/v2/repository/index", self.repository_index)
        for prefix in (model, versioned):
            app.router.add_get(prefix, self.model_metadata)
            app.router.add_get(prefix + "/ready", self.model_ready)
            app.router.add_get(prefix + "/config", self.model_config)
            app.router.add_get(prefix + "/stats", self.model_statistics)
            app.router.add_post(prefix + "/infer", self.infer)
        return app

    async def start(self) -> None:
        runner = web.AppRunner(self.application(), access_log=None, handle_signals=False)
        await runner.setup()
        # SO_REUSEPORT like the gRPC port: `serve --workers N` processes share it.
        site = web.TCPSite(
            runner, self.host, self.port, ssl_context=self.ssl_context, reuse_address=True, reuse_port=True
        )
        try:
            await site.start()
        except OSError as exc:
            await runner.cleanup()
            raise OSError(f"cannot listen for REST on {self.address}: {exc.strerror or exc}") from exc
        sockets = getattr(site._server, "sockets", None)  # the bound port, when 0 was asked for
        if sockets:
            self.port = sockets[0].getsockname()[1]
        self._runner = runner

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    @web.middleware
    async def _errors(
        self, request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        """Every failure as `{"error": ...}` with its HTTP status: gRPC statuses by HTTP_STATUS, aiohttp's
        own (unknown path, body over the limit) by theirs."""
        try:
            return await handler(request)
        except RestError as exc:
            return _error(exc.status, str(exc))
        except _Aborted as exc:
            return _error(HTTP_STATUS.get(exc.code, 500), exc.details or exc.code.name, exc.headers)
        except web.HTTPRequestEntityTooLarge as exc:
            return _error(
                413, f"request body over the router's limit of {self.max_body_bytes} bytes ({exc.text})"
            )
        except web.HTTPException as exc:
            if exc.status < 400:
                raise
            return _error(exc.status, exc.reason)
        except Exception:
            log.exception("unexpected error answering %s %s", request.method, request.path)
            return _error(500, f"internal router error answering {request.method} {request.path}")

    async def _call(self, method: str, message: Any, request: web.Request) -> tuple[bytes, HttpCallContext]:
        context = HttpCallContext(request)
        answer = await self._handlers[method](message.SerializeToString(), context)
        return answer, context

    async def live(self, request: web.Request) -> web.Response:
        answer, _ = await self._call("ServerLive", kserve.ServerLiveRequest(), request)
        live = kserve.ServerLiveResponse.FromString(answer).live
        return web.json_response({"live": live}, status=200 if live else 503)

    async def ready(self, request: web.Request) -> web.Response:
        answer, _ = await self._call("ServerReady", kserve.ServerReadyRequest(), request)
        ready = kserve.ServerReadyResponse.FromString(answer).ready
        return web.json_response({"ready": ready}, status=200 if ready else 503)

    async def server_metadata(self, request: web.Request) -> web.Response:
        answer, _ = await self._call("ServerMetadata", kserve.ServerMetadataRequest(), request)
        metadata = kserve.ServerMetadataResponse.FromString(answer)
        return web.json_response(
            {"name": metadata.name, "version": metadata.version, "extensions": list(metadata.extensions)}
        )

    async def repository_index(self, request: web.Request) -> web.Response:
        body = await request.read()
        query = _json_object(body, "the request body") if body.strip() else {}
        message = kserve.RepositoryIndexRequest(ready=bool(query.get("ready", False)))
        answer, _ = await self._call("RepositoryIndex", message, request)
        index = kserve.RepositoryIndexResponse.FromString(answer)
        return web.json_response(
            [{"name": m.name, "version": m.version, "state": m.state} for m in index.models]
        )

    async def model_metadata(self, request: web.Request) -> web.Response:
        name, version = request.match_info["name"], request.match_info.get("version", "")
        message = kserve.ModelMetadataRequest(name=name, version=version)
        answer, _ = await self._call("ModelMetadata", message, request)
        return web.json_response(_metadata_json(kserve.ModelMetadataResponse.FromString(answer)))

    async def model_ready(self, request: web.Request) -> web.Response:
        name, version = request.match_info["name"], request.match_info.get("version", "")
        message = kserve.ModelReadyRequest(name=name, version=version)
        answer, _ = await self._call("ModelReady", message, request)
        ready = kserve.ModelReadyResponse.FromString(answer).ready
        return web.json_response({"name": name, "ready": ready}, status=200 if ready else 400)

    async def model_config(self, request: web.Request) -> web.Response:
        name, version = request.match_info["name"], request.match_info.get("version", "")
        message = kserve.ModelConfigRequest(name=name, version=version)
        answer, _ = await self._call("ModelConfig", message, request)
        config = kserve.ModelConfigResponse.FromString(answer).config
        return web.json_response(json_format.MessageToDict(config, preserving_proto_field_name=True))

    async def model_statistics(self, request: web.Request) -> web.Response:
        name, version = request.match_info["name"], request.match_info.get("version", "")
        message = kserve.ModelStatisticsRequest(name=name, version=version)
        answer, _ = await self._call("ModelStatistics", message, request)
        statistics = kserve.ModelStatisticsResponse.FromString(answer)
        return web.json_response(json_format.MessageToDict(statistics, preserving_proto_field_name=True))

    async def infer(self, request: web.Request) -> web.Response:
        name, version = request.match_info["name"], request.match_info.get("version", "")
        body = await request.read()  # over client_max_size: HTTPRequestEntityTooLarge (413)
        header_length = request.headers.get(HEADER_LENGTH)
        if header_length is None:
            json_part, binary = body, b""
        else:
            if not header_length.isdigit() or int(header_length) > len(body):
                raise RestError(400, f"{HEADER_LENGTH} {header_length!r} is not a length within the body")
            json_part, binary = body[: int(header_length)], body[int(header_length) :]
        if len(json_part) > _PARSE_INLINE_BYTES:
            header = await asyncio.to_thread(_json_object, json_part, "the request body")
            message, fmt = await asyncio.to_thread(infer_request, header, binary, name, version)
        else:
            message, fmt = infer_request(_json_object(json_part, "the request body"), binary, name, version)
        answer, _ = await self._call("ModelInfer", message, request)
        response = kserve.ModelInferResponse.FromString(answer)
        body_out, json_length = infer_response(response, fmt)
        if json_length is None:
            return web.Response(body=body_out, content_type="application/json")
        return web.Response(
            body=body_out,
            content_type="application/octet-stream",
            headers={HEADER_LENGTH: str(json_length)},
        )
