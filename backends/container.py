"""Our own KServe v2 container: many small numpy models (backends/numpy_model.py) in one grpc.aio process.

`ModelHost` is the data plane: loaded versions keyed by (name, version), the memory budget, loads (one per
key however many callers, files read off the event loop), unloads that drain in-flight requests, and
statistics. `KServeServicer` is the thin `inference.GRPCInferenceService` front: it converts protobuf to
numpy and back, and every error becomes a gRPC status in one place (`_status`).

Load a model with `RepositoryModelLoad`: `model_name`, parameters `artifact_uri` (string, a `file://`
model directory; required) and `version` (string, default "1"). `RepositoryModelUnload` takes an optional
`version` parameter (default: every version) and succeeds when nothing is loaded, so it is idempotent.

Closed to strangers: with a fleet secret, every call but the gRPC health check must carry the header
`triton-grpc-protocol-modelyard-fleet-secret` (as Triton's restricted protocols check it), and with a
model store, artifacts load only from inside it. Model math runs in a thread pool, so a slow model never
stalls the event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hmac
import logging
import math
import signal
import socket
import time
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

import grpc
import grpc.aio
import numpy as np
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from tritonclient.grpc import model_config_pb2 as config_pb2
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc as pb_grpc

from backends.modelstore import file_path
from backends.numpy_model import (
    DTYPES,
    ModelFormatError,
    NumpyModel,
    TensorError,
    TensorSpec,
    load_model_dir,
)
from backends.triton_server import FLEET_SECRET_HEADER
from modelyard import metric_names as names
from modelyard.telemetry import Telemetry
from placement.model import version_order

log = logging.getLogger(__name__)
R = TypeVar("R")

SERVER_NAME = "modelyard-container"
SERVER_VERSION = "0.1.0"
DEFAULT_VERSION = "1"
FINAL_RESPONSE = "triton_final_response"  # the response parameter Triton sets on a decoupled model's last
DRAIN_TIMEOUT_S = 30.0
# Over this, gRPC refuses the message with RESOURCE_EXHAUSTED naming the limit, before buffering it.
DEFAULT_MAX_MESSAGE_BYTES = 64 * 1024**2
_OPEN_METHODS = ("/grpc.health.v1.Health/",)  # probes (kubelet) call these without the secret
# Typed `contents` fields per datatype (FP16 travels as raw bytes only, as in Triton).
_CONTENTS_FIELD = {
    "BOOL": "bool_contents",
    "INT8": "int_contents",
    "INT16": "int_contents",
    "INT32": "int_contents",
    "INT64": "int64_contents",
    "UINT8": "uint_contents",
    "UINT16": "uint_contents",
    "UINT32": "uint_contents",
    "UINT64": "uint64_contents",
    "FP32": "fp32_contents",
    "FP64": "fp64_contents",
}


class ContainerError(Exception):
    code = grpc.StatusCode.INTERNAL


class BadRequest(ContainerError):
    code = grpc.StatusCode.INVALID_ARGUMENT


class ModelNotFound(ContainerError):
    code = grpc.StatusCode.NOT_FOUND


class PermissionDenied(ContainerError):
    code = grpc.StatusCode.PERMISSION_DENIED


class OverBudget(ContainerError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class Unavailable(ContainerError):
    """The version is being unloaded: the request did not run, so another copy may take it."""

    code = grpc.StatusCode.UNAVAILABLE


def _status(exc: Exception) -> tuple[grpc.StatusCode, str]:
    """The one mapping from errors to gRPC statuses (call from an except block)."""
    if isinstance(exc, ContainerError):
        return exc.code, str(exc)
    if isinstance(exc, ModelFormatError | TensorError):
        return grpc.StatusCode.INVALID_ARGUMENT, str(exc)
    log.exception("unexpected container error")
    return grpc.StatusCode.INTERNAL, f"internal container error: {type(exc).__name__}: {exc}"


def artifact_dir(artifact_uri: str) -> Path:
    path = file_path(artifact_uri) if artifact_uri.startswith("file:") else None
    if path is None:
        raise BadRequest(f"artifact_uri must be a file:// directory, got {artifact_uri!r}")
    return path


def check_in_store(path: Path, model_store: Path) -> None:
    """Refuses a model directory outside `model_store` (resolved first: neither `..` nor a symbolic link
    leads out of it). File system calls: run it off the event loop."""
    if not path.resolve().is_relative_to(model_store.resolve()):
        raise PermissionDenied(f"model directory {str(path)!r} is outside this container's model store")


class LoadedVersion:
    """One loaded model version: the model, its in-flight requests and its statistics."""

    __slots__ = (
        "_drained",
        "artifact_uri",
        "execution_count",
        "fail_count",
        "fail_ns",
        "in_flight",
        "inference_count",
        "last_inference_ms",
        "model",
        "name",
        "success_count",
        "success_ns",
        "unloading",
        "version",
    )

    def __init__(self, name: str, version: str, artifact_uri: str, model: NumpyModel) -> None:
        self.name = name
        self.version = version
        self.artifact_uri = artifact_uri
        self.model = model
        self.unloading = False
        self.in_flight = 0
        self._drained: asyncio.Future[None] | None = None
        self.inference_count = self.execution_count = 0
        self.success_count = self.success_ns = self.fail_count = self.fail_ns = 0
        self.last_inference_ms = 0

    def __repr__(self) -> str:
        return f"LoadedVersion({self.name!r}, {self.version!r}, in_flight={self.in_flight})"

    def release(self) -> None:
        self.in_flight -= 1
        if self.in_flight == 0 and self._drained is not None and not self._drained.done():
            self._drained.set_result(None)

    async def drain(self, timeout_s: float) -> bool:
        """Waits until no request runs on this version; False if some still do after `timeout_s`."""
        if self.in_flight == 0:
            return True
        self._drained = asyncio.get_running_loop().create_future()
        try:
            await asyncio.wait_for(asyncio.shield(self._drained), timeout_s)
        except TimeoutError:
            return False
        return True

    def record(self, start_ns: int, ok: bool) -> None:
        """Counts one request; like Triton, inference and execution counts are of successful ones only."""
        elapsed_ns = time.perf_counter_ns() - start_ns
        self.last_inference_ms = time.time_ns() // 1_000_000
        if ok:
            self.inference_count += 1
            self.execution_count += 1
            self.success_count += 1
            self.success_ns += elapsed_ns
        else:
            self.fail_count += 1
            self.fail_ns += elapsed_ns


class _KeyLock:
    """An asyncio.Lock for one (name, version), dropped when nobody holds or waits for it."""

    __slots__ = ("lock", "users")

    def __init__(self) -> None:
        self.lock = asyncio.Lock()
        self.users = 0


class ModelHost:
    """The loaded model versions of one container, under its memory budget (sum of weight bytes)."""

    def __init__(
        self,
        memory_bytes: int,
        *,
        loader: Callable[[Path], NumpyModel] = load_model_dir,
        drain_timeout_s: float = DRAIN_TIMEOUT_S,
        model_store: Path | None = None,
        compute_threads: int | None = None,
    ) -> None:
        """`model_store`: load only from inside this directory (None: anywhere). `compute_threads`: the
        pool running model math (numpy releases the GIL in most of it); default: Python's choice."""
        self.memory_bytes = memory_bytes
        self.model_store = model_store
        self.compute = ThreadPoolExecutor(compute_threads, thread_name_prefix="model-compute")
        self.used_bytes = 0
        self.load_count = 0  # artifact reads performed; concurrent loads of one key share one
        self.drain_timeout_s = drain_timeout_s
        self._loader = loader
        self._models: dict[str, dict[str, LoadedVersion]] = {}
        self._locks: dict[tuple[str, str], _KeyLock] = {}
        self._loading: set[tuple[str, str]] = set()

    def find(self, name: str, version: str) -> LoadedVersion | None:
        versions = self._models.get(name)
        return versions.get(version) if versions else None

    def resolve(self, name: str, version: str) -> LoadedVersion:
        """The version a request names, or the highest one not being unloaded when it names none."""
        versions = self._models.get(name)
        if not versions:
            raise ModelNotFound(f"model '{name}' is not loaded")
        if version:
            loaded = versions.get(version)
            if loaded is None:
                raise ModelNotFound(
                    f"model '{name}' version '{version}' is not loaded (loaded: {', '.join(versions)})"
                )
            return loaded
        serving = [v for v in versions.values() if not v.unloading] or list(versions.values())
        return max(serving, key=lambda v: version_order(v.version))

    def versions(self, name: str) -> list[LoadedVersion]:
        return sorted(self._models.get(name, {}).values(), key=lambda v: version_order(v.version))

    def all_versions(self) -> list[LoadedVersion]:
        return [v for name in sorted(self._models) for v in self.versions(name)]

    @contextlib.contextmanager
    def serving(self, name: str, version: str) -> Iterator[LoadedVersion]:
        """The version for one request, counted in flight so an unload waits for it."""
        loaded = self.resolve(name, version)
        if loaded.unloading:
            raise Unavailable(f"model '{name}' version '{loaded.version}' is being unloaded")
        loaded.in_flight += 1
        try:
            yield loaded
        finally:
            loaded.release()

    @contextlib.asynccontextmanager
    async def _locked(self, key: tuple[str, str]) -> AsyncIterator[None]:
        entry = self._locks.get(key)
        if entry is None:
            entry = self._locks[key] = _KeyLock()
        entry.users += 1
        try:
            async with entry.lock:
                yield
        finally:
            entry.users -= 1
            if entry.users == 0:
                del self._locks[key]

    async def load(self, name: str, version: str, artifact_uri: str) -> LoadedVersion:
        """Loads a version (or replaces it when `artifact_uri` changed); a no-op when already loaded."""
        path = artifact_dir(artifact_uri)
        current = self.find(name, version)
        if current is not None and current.artifact_uri == artifact_uri and not current.unloading:
            return current
        key = (name, version)
        async with self._locked(key):
            # Checked again: whoever held the lock before us may have loaded it already.
            current = self.find(name, version)
            if current is not None and current.artifact_uri == artifact_uri:
                return current
            self._loading.add(key)
            self.load_count += 1
            started = time.perf_counter()
            try:
                model = await asyncio.to_thread(self._read, path)
            finally:
                self._loading.discard(key)
            # No await from here on: the budget check and the commit are atomic on the event loop.
            needed = model.memory_bytes
            freed = current.model.memory_bytes if current is not None else 0
            if self.used_bytes - freed + needed > self.memory_bytes:
                replacing = f" ({freed} bytes would be freed by replacing the loaded copy)" if freed else ""
                raise OverBudget(
                    f"model '{name}' version '{version}' needs {needed} bytes; "
                    f"{self.used_bytes} of {self.memory_bytes} bytes are used{replacing}"
                )
            self.used_bytes += needed - freed
            if current is not None:
                current.model = model  # requests already running keep the model they started with
                current.artifact_uri = artifact_uri
                loaded = current
            else:
                loaded = LoadedVersion(name, version, artifact_uri, model)
                self._models.setdefault(name, {})[version] = loaded
            log.debug(
                "loaded %s@%s (%d bytes) in %.1f ms",
                name,
                version,
                needed,
                (time.perf_counter() - started) * 1e3,
            )
            return loaded

    def _read(self, path: Path) -> NumpyModel:
        if self.model_store is not None:
            check_in_store(path, self.model_store)
        return self._loader(path)

    async def run(self, fn: Callable[..., R], *args: Any) -> R:
        """`fn(*args)` on the compute pool: the event loop keeps serving other models meanwhile."""
        return await asyncio.get_running_loop().run_in_executor(self.compute, fn, *args)

    async def unload(self, name: str, version: str | None = None) -> list[str]:
        """Unloads one version (or all of `name`'s); returns the versions unloaded."""
        targets = [version] if version else list(self._models.get(name, {}))
        done = await asyncio.gather(*(self._unload_one(name, v) for v in targets))
        return [v for v, unloaded in zip(targets, done, strict=True) if unloaded]

    async def _unload_one(self, name: str, version: str) -> bool:
        async with self._locked((name, version)):
            loaded = self.find(name, version)
            if loaded is None:
                return False
            loaded.unloading = True  # new requests get UNAVAILABLE from here on
            if not await loaded.drain(self.drain_timeout_s):
                log.warning(
                    "unloading %s@%s with %d requests still running after %.0f s",
                    name,
                    version,
                    loaded.in_flight,
                    self.drain_timeout_s,
                )
            versions = self._models[name]
            del versions[version]
            if not versions:
                del self._models[name]
            self.used_bytes -= loaded.model.memory_bytes
            return True

    def index(self) -> list[tuple[str, str, str]]:
        """(name, version, state) of every version loaded or loading; state READY, UNLOADING or LOADING."""
        rows = [(v.name, v.version, "UNLOADING" if v.unloading else "READY") for v in self.all_versions()]
        rows += [
            (name, version, "LOADING") for name, version in self._loading if not self.find(name, version)
        ]
        return sorted(rows, key=lambda r: (r[0], version_order(r[1])))


# --- protobuf <-> numpy ---------------------------------------------------------------------------------


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
        field = _CONTENTS_FIELD.get(spec.datatype)
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


def _infer(loaded: LoadedVersion, request: Any) -> Any:
    """One request's decode, model math and encode (runs on the compute pool)."""
    inputs = decode_inputs(request, loaded.model)
    names = requested_outputs(request, loaded.model)
    return infer_response(loaded, request, loaded.model.run(inputs), names)


def _tensor_metadata(specs: Sequence[TensorSpec]) -> list[Any]:
    return [
        pb.ModelMetadataResponse.TensorMetadata(name=s.name, datatype=s.datatype, shape=s.shape)
        for s in specs
    ]


def _config_tensors(specs: Sequence[TensorSpec], kind: Any) -> list[Any]:
    return [
        kind(name=s.name, data_type=config_pb2.DataType.Value(f"TYPE_{s.datatype}"), dims=s.shape)
        for s in specs
    ]


def _statistics(loaded: LoadedVersion) -> Any:
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


def _string_parameter(parameters: Any, key: str) -> str | None:
    if key not in parameters:
        return None
    parameter = parameters[key]
    kind = parameter.WhichOneof("parameter_choice")
    if kind == "string_param":
        return str(parameter.string_param)
    if kind == "int64_param":
        return str(parameter.int64_param)
    raise BadRequest(f"parameter '{key}' must be a string")


# --- the gRPC front -------------------------------------------------------------------------------------

H = TypeVar("H", bound="KServeServicer")
Unary = Callable[[H, Any, grpc.aio.ServicerContext], Awaitable[Any]]


def _unary(fn: Unary[H]) -> Unary[H]:
    """Errors of a unary method -> its gRPC status."""

    @functools.wraps(fn)
    async def wrapper(self: H, request: Any, context: grpc.aio.ServicerContext) -> Any:
        telemetry = self.telemetry
        span_context: Any = (
            telemetry.start_server_span(fn.__name__, context.invocation_metadata())
            if telemetry is not None and telemetry.tracing
            else contextlib.nullcontext()
        )
        with span_context as span:
            if span is not None:
                span.set_attribute("modelyard.model", getattr(request, "model_name", ""))
            try:
                return await fn(self, request, context)
            except Exception as exc:
                code, message = _status(exc)
                if span is not None:
                    span.set_attribute("rpc.grpc.status_code", code.name)
        await context.abort(code, message)

    return wrapper


class KServeServicer(pb_grpc.GRPCInferenceServiceServicer):
    """`inference.GRPCInferenceService` over a ModelHost. Shared memory, trace, log calls: UNIMPLEMENTED."""

    def __init__(self, host: ModelHost, telemetry: Telemetry | None = None) -> None:
        self.host = host
        self.telemetry = telemetry

    @_unary
    async def ServerLive(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        return pb.ServerLiveResponse(live=True)

    @_unary
    async def ServerReady(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        return pb.ServerReadyResponse(ready=True)

    @_unary
    async def ServerMetadata(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        return pb.ServerMetadataResponse(
            name=SERVER_NAME,
            version=SERVER_VERSION,
            extensions=["model_repository", "model_configuration", "statistics"],
        )

    @_unary
    async def ModelReady(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        # Like Triton: an unknown, unloading or still-loading model is "not ready", not an error.
        try:
            loaded = self.host.resolve(request.name, request.version)
        except ModelNotFound:
            return pb.ModelReadyResponse(ready=False)
        return pb.ModelReadyResponse(ready=not loaded.unloading)

    @_unary
    async def ModelMetadata(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        loaded = self.host.resolve(request.name, request.version)
        versions = (
            [loaded.version]
            if request.version
            else [v.version for v in self.host.versions(request.name) if not v.unloading]
        )
        return pb.ModelMetadataResponse(
            name=loaded.name,
            versions=versions,
            platform="numpy",
            inputs=_tensor_metadata(loaded.model.inputs),
            outputs=_tensor_metadata(loaded.model.outputs),
        )

    @_unary
    async def ModelConfig(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        loaded = self.host.resolve(request.name, request.version)
        model = loaded.model
        config = config_pb2.ModelConfig(
            name=loaded.name,
            backend="numpy",
            max_batch_size=0,
            input=_config_tensors(model.inputs, config_pb2.ModelInput),
            output=_config_tensors(model.outputs, config_pb2.ModelOutput),
        )
        config.parameters["op"].string_value = model.op
        if model.decoupled:
            config.model_transaction_policy.decoupled = True
        return pb.ModelConfigResponse(config=config)

    @_unary
    async def ModelStatistics(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        if not request.name:
            selected = self.host.all_versions()
        elif request.version:
            found = self.host.find(request.name, request.version)
            if found is None:
                raise ModelNotFound(f"model '{request.name}' version '{request.version}' is not loaded")
            selected = [found]
        else:
            selected = self.host.versions(request.name)
            if not selected:
                raise ModelNotFound(f"model '{request.name}' is not loaded")
        return pb.ModelStatisticsResponse(model_stats=[_statistics(v) for v in selected])

    @_unary
    async def ModelInfer(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        with self.host.serving(request.model_name, request.model_version) as loaded:
            if loaded.model.decoupled:
                raise BadRequest(
                    f"model '{loaded.name}' is decoupled (op {loaded.model.op}): call ModelStreamInfer"
                )
            start_ns = time.perf_counter_ns()
            try:
                response = await self.host.run(_infer, loaded, request)
            except Exception as exc:
                loaded.record(start_ns, ok=False)
                if isinstance(exc, TensorError):
                    raise BadRequest(f"model '{loaded.name}' version '{loaded.version}': {exc}") from exc
                raise
            loaded.record(start_ns, ok=True)
            return response

    async def ModelStreamInfer(
        self, request_iterator: AsyncIterator[Any], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[Any]:
        """Bidi: each request's responses in order; an error is an `error_message` and the stream goes on."""
        async for request in request_iterator:
            try:
                async with contextlib.aclosing(self._stream_responses(request)) as responses:
                    async for response in responses:
                        yield pb.ModelStreamInferResponse(infer_response=response)
            except Exception as exc:
                yield pb.ModelStreamInferResponse(error_message=_status(exc)[1])

    async def _stream_responses(self, request: Any) -> AsyncGenerator[Any, None]:
        """One request's responses, each sent as produced; the last carries triton_final_response=true."""
        with self.host.serving(request.model_name, request.model_version) as loaded:
            start_ns = time.perf_counter_ns()
            try:
                model = loaded.model
                inputs = await self.host.run(decode_inputs, request, model)
                names = requested_outputs(request, model)
                pending = None
                steps = model.stream(inputs)
                while (outputs := await self.host.run(next, steps, None)) is not None:
                    if pending is not None:
                        yield pending
                    pending = infer_response(loaded, request, outputs, names)
                    pending.parameters[FINAL_RESPONSE].bool_param = False
                if pending is None:  # nothing to stream: an empty response carries the final flag
                    pending = pb.ModelInferResponse(
                        model_name=loaded.name, model_version=loaded.version, id=request.id
                    )
            except Exception as exc:
                loaded.record(start_ns, ok=False)
                if isinstance(exc, TensorError):
                    raise BadRequest(f"model '{loaded.name}' version '{loaded.version}': {exc}") from exc
                raise
            pending.parameters[FINAL_RESPONSE].bool_param = True
            loaded.record(start_ns, ok=True)
            yield pending

    @_unary
    async def RepositoryIndex(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        rows = self.host.index()
        return pb.RepositoryIndexResponse(
            models=[
                pb.RepositoryIndexResponse.ModelIndex(name=name, version=version, state=state)
                for name, version, state in rows
                if not request.ready or state == "READY"
            ]
        )

    @_unary
    async def RepositoryModelLoad(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        if not request.model_name:
            raise BadRequest("model_name is required")
        version = _string_parameter(request.parameters, "version") or DEFAULT_VERSION
        artifact_uri = _string_parameter(request.parameters, "artifact_uri")
        if not artifact_uri:
            raise BadRequest(f"loading model '{request.model_name}' needs the parameter artifact_uri")
        await self.host.load(request.model_name, version, artifact_uri)
        return pb.RepositoryModelLoadResponse()

    @_unary
    async def RepositoryModelUnload(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        if not request.model_name:
            raise BadRequest("model_name is required")
        await self.host.unload(request.model_name, _string_parameter(request.parameters, "version"))
        return pb.RepositoryModelUnloadResponse()


class FleetSecretCheck(grpc.aio.ServerInterceptor):
    """Refuses every call without the fleet secret header (UNAUTHENTICATED), the health check excepted."""

    def __init__(self, secret: str) -> None:
        self.secret = secret.encode()

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        if handler is None or details.method.startswith(_OPEN_METHODS):
            return handler
        for key, value in details.invocation_metadata or ():
            if key == FLEET_SECRET_HEADER:
                given = value if isinstance(value, bytes) else str(value).encode()
                if hmac.compare_digest(given, self.secret):
                    return handler
        return _refusal(handler)


def _refusal(handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
    """A handler of `handler`'s kind that answers UNAUTHENTICATED without reading the request."""
    message = f"this container serves only its fleet: the {FLEET_SECRET_HEADER} header is missing or wrong"

    async def refuse(request: Any, context: grpc.aio.ServicerContext) -> None:
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

    if handler.request_streaming and handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(refuse)
    if handler.request_streaming:
        return grpc.stream_unary_rpc_method_handler(refuse)
    if handler.response_streaming:
        return grpc.unary_stream_rpc_method_handler(refuse)
    return grpc.unary_unary_rpc_method_handler(refuse)


class CustomContainer:
    """A KServe v2 gRPC server hosting numpy models under a memory budget."""

    def __init__(
        self,
        memory_bytes: int,
        *,
        loader: Callable[[Path], NumpyModel] = load_model_dir,
        drain_timeout_s: float = DRAIN_TIMEOUT_S,
        telemetry: Telemetry | None = None,
        server_credentials: grpc.ServerCredentials | None = None,
        fleet_secret: str | None = None,
        model_store: Path | None = None,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
    ) -> None:
        """`fleet_secret`: calls must carry it; `model_store`: load only from inside it."""
        self.models = ModelHost(
            memory_bytes, loader=loader, drain_timeout_s=drain_timeout_s, model_store=model_store
        )
        self.telemetry = telemetry
        self.server_credentials = server_credentials
        self.fleet_secret = fleet_secret
        self.max_message_bytes = max_message_bytes
        self._server: grpc.aio.Server | None = None
        self._address = ""

    @property
    def address(self) -> str:
        if not self._address:
            raise RuntimeError("the container is not started")
        return self._address

    @property
    def memory_bytes(self) -> int:
        return self.models.memory_bytes

    @property
    def used_bytes(self) -> int:
        return self.models.used_bytes

    @property
    def load_count(self) -> int:
        return self.models.load_count

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> None:
        options = (
            ("grpc.max_send_message_length", self.max_message_bytes),
            ("grpc.max_receive_message_length", self.max_message_bytes),
        )
        interceptors = [FleetSecretCheck(self.fleet_secret)] if self.fleet_secret else []
        server = grpc.aio.server(options=options, interceptors=interceptors)
        pb_grpc.add_GRPCInferenceServiceServicer_to_server(
            KServeServicer(self.models, self.telemetry), server
        )
        health_servicer = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
        service = pb.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name
        for name in ("", service):
            await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
        health_name = health_pb2.DESCRIPTOR.services_by_name["Health"].full_name
        reflection.enable_server_reflection((service, health_name, reflection.SERVICE_NAME), server)
        target = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        try:
            if self.server_credentials is not None:
                bound = server.add_secure_port(target, self.server_credentials)
            else:
                bound = server.add_insecure_port(target)
        except RuntimeError as exc:
            raise OSError(f"cannot listen on {target}: {exc}") from exc
        if not bound:
            raise OSError(f"cannot listen on {target}")
        await server.start()
        self._server = server
        self._address = f"[{host}]:{bound}" if ":" in host else f"{host}:{bound}"

    async def wait(self) -> None:
        """Returns when the server stops."""
        if self._server is not None:
            await self._server.wait_for_termination()

    async def stop(self, grace_s: float = 5.0) -> None:
        if self._server is not None:
            await self._server.stop(grace_s)
            self._server = None
        self.models.compute.shutdown(wait=False)


async def run_container(
    host: str,
    port: int,
    memory_bytes: int,
    telemetry: Telemetry | None = None,
    server_credentials: grpc.ServerCredentials | None = None,
    *,
    fleet_secret: str | None = None,
    model_store: Path | None = None,
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
    drain_s: float = 10.0,
) -> None:
    """Serves a container until cancelled or SIGTERM/SIGINT; prints `container listening on HOST:PORT` once
    it accepts calls. On a signal it refuses new calls and gives those in flight `drain_s` to finish."""
    container = CustomContainer(
        memory_bytes,
        telemetry=telemetry,
        server_credentials=server_credentials,
        fleet_secret=fleet_secret,
        model_store=model_store,
        max_message_bytes=max_message_bytes,
    )
    await container.start(host, port)
    if telemetry is not None and telemetry.metrics:
        # The host name: a pod's name on Kubernetes, which is also its agent's container id there.
        label = {"container": socket.gethostname()}
        telemetry.gauge(
            names.CONTAINER_MEMORY_USED, lambda: [(float(container.used_bytes), label)], "Bytes loaded"
        )
        telemetry.gauge(
            names.CONTAINER_MEMORY_CAPACITY, lambda: [(float(container.memory_bytes), label)], "Memory budget"
        )
        telemetry.serve_metrics()
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stopping.set)
    print(f"container listening on {container.address}", flush=True)
    try:
        await stopping.wait()  # not container.wait(): cancelling that cancels the server's own shutdown
    finally:
        await container.stop(drain_s)
