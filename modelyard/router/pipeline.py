"""Running pipelines (placement/pipeline.py) in the router: a pipeline name answers like a model's.

Each step is one `ModelInfer` through `Router.forward_unary` (a ready copy, lazy load, failover when a
copy never ran the request), with the caller's credentials, so the caller's tenant must see every step's
model and the routing rules choose an unpinned step's version. Steps start as soon as the tensors they read
exist, so independent steps run concurrently. Tensors pass from step to step as the bytes the container
sent (`raw_output_contents` -> `raw_input_contents`) under their new names; nothing is decoded into arrays.
The caller's deadline (else the router's default) covers the whole pipeline. A failing step fails the call
with that step's status and a message naming the pipeline, the step and the model, and cancels the steps
still running; nothing is retried once a step has produced output (a step's own call is resent only when
it provably never ran, as any unary call is).

A pipeline whose last step is decoupled streams: `InferStream` runs the other steps, then relays the last
step's responses with the pipeline's tensor names.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import grpc
import grpc.aio
from opentelemetry.trace import Status, StatusCode
from tritonclient.grpc import service_pb2 as kserve

from modelyard.errors import ModelyardError, Unimplemented
from modelyard.placement.pipeline import Pipeline, Step, shapes_match
from modelyard.router.errors import (
    BadRequest,
    ContainerStreamError,
    DeadlineExceeded,
    ModelNotFound,
    parse_request,
)
from modelyard.router.stream import Sink, _write
from modelyard.router.versions import resolve_version
from modelyard.router.wire import WireError, read_header
from modelyard.telemetry import CURRENT_CALL, OTHER_LABEL, CallInfo

if TYPE_CHECKING:
    from modelyard.router.routing import Router  # the runner's owner, which imports this module

MODEL_INFER = "/inference.GRPCInferenceService/ModelInfer"
PLATFORM = "modelyard_pipeline"
_FINAL = "triton_final_response"


class StepFailed(ModelyardError):
    """A step's call failed: the pipeline's call fails with the step's status."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message, code)


class NotForPipelines(Unimplemented):
    """A call a pipeline cannot answer as a model would."""


@dataclass(frozen=True)
class Tensor:
    """A pipeline tensor between steps: its header and its bytes, as a container (or the caller) sent
    them. `contents` instead of `raw` only for a caller's input sent as typed contents."""

    datatype: str
    shape: tuple[int, ...]
    raw: bytes | None
    contents: Any = None


def pipeline_name(router: Router, request: bytes) -> str | None:
    """The pipeline a model-level request names, or None (a model, or bytes the model path refuses).

    A registered model of the same name wins (registration refuses that clash, this covers a race)."""
    fleet = router.table.fleet
    if not fleet.pipelines_by_name:
        return None  # no pipelines: one attribute read on every call
    try:
        name = read_header(request)[0]
    except WireError:
        return None
    return name if name in fleet.pipelines_by_name and name not in fleet.by_name else None


class PipelineRunner:
    """Runs the router's pipeline calls; made by the Router (it holds no resources of its own)."""

    def __init__(self, router: Router) -> None:
        self.router = router

    # -- resolving -------------------------------------------------------------------------------------

    def resolve(
        self, name: str, version: str, request_id: str, context: grpc.aio.ServicerContext
    ) -> Pipeline:
        """The pipeline version the caller gets: invisible to other tenants exactly as a model is, and
        chosen by the same rules (explicit version, tenant pin, split, default, highest)."""
        identity = self.router.identify(context)
        tenant = identity.tenant
        call = CURRENT_CALL.get()
        if call is not None:
            call.model, call.version, call.tenant = name, version, tenant or ""
            call.model_label, call.tenant_label = OTHER_LABEL, OTHER_LABEL if tenant else ""
        fleet = self.router.table.fleet
        pipeline = resolve_version(
            name,
            fleet.pipelines_by_name.get(name),
            requested=version,
            tenant=tenant,
            request_id=request_id,
            rule=fleet.routes.get(name),
        )
        if call is not None:
            call.version = pipeline.version
            call.model_label = name
            call.tenant_label = (
                tenant
                if tenant and (identity.via != "header" or tenant in pipeline.tenants)
                else call.tenant_label
            )
        return pipeline

    def _request(self, request: bytes, context: grpc.aio.ServicerContext) -> tuple[Pipeline, Any]:
        if not self.router.table.loaded:
            from modelyard.router.errors import NotReady

            raise NotReady("routing table not loaded yet")
        message = parse_request(kserve.ModelInferRequest, request)
        pipeline = self.resolve(message.model_name, message.model_version, message.id, context)
        return pipeline, message

    # -- calls -----------------------------------------------------------------------------------------

    async def unary(self, method: str, request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        """A KServe model-level unary call (by RPC name) on a pipeline."""
        if method == "ModelInfer":
            return await self.infer(request, context)
        if method == "ModelMetadata":
            return self.metadata(request, context)
        if method == "ModelReady":
            return self.ready(request, context)
        raise NotForPipelines(
            f"'{read_header(request)[0]}' is a pipeline: {method} concerns models "
            "(ModelMetadata describes a pipeline)"
        )

    async def infer(self, request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        """`ModelInfer` / `Infer` on a pipeline."""
        pipeline, message = self._request(request, context)
        if pipeline.streaming:
            raise BadRequest(
                f"pipeline '{pipeline.name}' streams (its last step is decoupled): call InferStream"
            )
        with self.router.admission.admitted(self.router.identify(context).tenant):  # one for all steps
            tensors = await self._run(pipeline, message, pipeline.steps, context)
        return self._response(pipeline, message, tensors).SerializeToString()

    async def infer_stream(self, request: bytes, context: grpc.aio.ServicerContext) -> None:
        """`InferStream` on a pipeline: the last step's responses as the pipeline's, up to the final one;
        a pipeline that does not stream answers once (its response marked final)."""
        pipeline, message = self._request(request, context)
        with self.router.admission.admitted(self.router.identify(context).tenant):  # one for all steps
            if not pipeline.streaming:
                tensors = await self._run(pipeline, message, pipeline.steps, context)
                response = self._response(pipeline, message, tensors)
                response.parameters[_FINAL].bool_param = True
                await _write(context, response.SerializeToString())
                return
            last = next(s for s in pipeline.steps if s.decoupled)
            before = tuple(s for s in pipeline.steps if s is not last)
            async with self._deadline(pipeline, context):
                tensors = await self._run(pipeline, message, before, context)
                await self._stream_last(pipeline, message, last, tensors, context)

    def metadata(self, request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        """`ModelMetadata`: the pipeline's tensors and the versions the caller may call."""
        query = parse_request(kserve.ModelMetadataRequest, request)
        pipeline = self.resolve(query.name, query.version, "", context)
        tenant = self.router.identify(context).tenant
        versions = self.router.table.fleet.pipelines_by_name.get(pipeline.name, {})
        answer = kserve.ModelMetadataResponse(
            name=pipeline.name,
            versions=sorted(v for v, p in versions.items() if p.visible_to(tenant)),
            platform=PLATFORM,
        )
        for tensors, into in ((pipeline.inputs, answer.inputs), (pipeline.outputs, answer.outputs)):
            for t in tensors:
                into.add(name=t.name, datatype=t.datatype, shape=list(t.shape))
        return answer.SerializeToString()

    def ready(self, request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        """`ModelReady`: true when every step's model (as the caller's rules choose it) has a ready copy;
        like a model's, asking loads nothing and an unknown pipeline is not ready."""
        query = parse_request(kserve.ModelReadyRequest, request)
        try:
            pipeline = self.resolve(query.name, query.version, "", context)
        except ModelNotFound:
            return kserve.ModelReadyResponse(ready=False).SerializeToString()
        tenant = self.router.identify(context).tenant
        return kserve.ModelReadyResponse(ready=self.is_ready(pipeline, tenant)).SerializeToString()

    def is_ready(self, pipeline: Pipeline, tenant: str | None) -> bool:
        """Every step's model, as `tenant`'s rules choose it, has a ready copy."""
        table = self.router.table
        for step in pipeline.steps:
            try:
                model = table.resolve(step.model_name, step.model_version, tenant)
            except ModelNotFound:
                return False
            if not table.ready_copies(model.key):
                return False
        return True

    # -- running ---------------------------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def _deadline(self, pipeline: Pipeline, context: grpc.aio.ServicerContext) -> Any:
        """The whole pipeline within the caller's deadline, or the router's default when it set none."""
        remaining = context.time_remaining()
        budget = self.router.default_deadline_s if remaining is None else remaining
        try:
            async with asyncio.timeout(budget):
                yield
        except TimeoutError:
            raise DeadlineExceeded(
                f"pipeline '{pipeline.name}' did not finish within the call's deadline ({budget:.3g} s)"
            ) from None

    def _inputs(self, pipeline: Pipeline, message: Any) -> dict[str, Tensor]:
        """The caller's tensors, checked against the pipeline's inputs (names, datatypes, shapes)."""
        raw = message.raw_input_contents
        if raw and len(raw) != len(message.inputs):
            raise BadRequest(
                f"pipeline '{pipeline.name}': {len(message.inputs)} inputs but {len(raw)} raw_input_contents"
            )
        declared = {t.name: t for t in pipeline.inputs}
        tensors: dict[str, Tensor] = {}
        for i, given in enumerate(message.inputs):
            spec = declared.get(given.name)
            if spec is None:
                raise BadRequest(
                    f"pipeline '{pipeline.name}' has no input '{given.name}' (inputs: {', '.join(declared)})"
                )
            if given.name in tensors:
                raise BadRequest(f"pipeline '{pipeline.name}': input '{given.name}' given twice")
            shape = tuple(given.shape)
            if given.datatype != spec.datatype or not shapes_match(shape, spec.shape):
                raise BadRequest(
                    f"pipeline '{pipeline.name}': input '{given.name}' is {given.datatype} {list(shape)}, "
                    f"the pipeline takes {spec.describe()}"
                )
            if raw:
                tensors[given.name] = Tensor(given.datatype, shape, raw[i])
            elif given.HasField("contents"):
                tensors[given.name] = Tensor(given.datatype, shape, None, given.contents)
            else:
                raise BadRequest(f"pipeline '{pipeline.name}': input '{given.name}' has no data")
        for name in declared:
            if name not in tensors:
                raise BadRequest(f"pipeline '{pipeline.name}': missing input '{name}'")
        return tensors

    async def _run(
        self, pipeline: Pipeline, message: Any, steps: tuple[Step, ...], context: grpc.aio.ServicerContext
    ) -> dict[str, Tensor]:
        """Runs `steps`, each as soon as its inputs exist; returns every tensor."""
        tensors = self._inputs(pipeline, message)
        async with self._deadline(pipeline, context):
            pending = list(steps)
            running: dict[asyncio.Task[dict[str, Tensor]], Step] = {}
            try:
                while pending or running:
                    for step in [s for s in pending if all(t in tensors for _, t in s.inputs)]:
                        pending.remove(step)
                        task = asyncio.create_task(self._step(pipeline, step, message.id, tensors, context))
                        running[task] = step
                    if not running:  # cannot happen for a checked spec; never wait on nothing
                        raise StepFailed(grpc.StatusCode.INTERNAL, f"pipeline '{pipeline.name}' is stuck")
                    done, _ = await asyncio.wait(running, return_when=asyncio.FIRST_COMPLETED)
                    finished = [(task, running.pop(task)) for task in done]
                    errors = [e for task, _ in finished if (e := task.exception()) is not None]
                    if errors:
                        raise errors[0]
                    for task, _ in finished:
                        tensors.update(task.result())
            finally:
                for task in running:
                    task.cancel()
                if running:
                    await asyncio.gather(*running, return_exceptions=True)
        return tensors

    def _step_request(self, step: Step, request_id: str, tensors: dict[str, Tensor]) -> Any:
        request = kserve.ModelInferRequest(model_name=step.model_name, model_version=step.model_version)
        if request_id:
            request.id = request_id
        given = [tensors[t] for _, t in step.inputs]
        raw = all(t.raw is not None for t in given)
        for (model_input, _), tensor in zip(step.inputs, given, strict=True):
            entry = request.inputs.add(name=model_input, datatype=tensor.datatype, shape=list(tensor.shape))
            if raw:
                request.raw_input_contents.append(tensor.raw)
            elif tensor.contents is not None:
                entry.contents.CopyFrom(tensor.contents)
            else:
                # Typed contents and raw bytes cannot be mixed in one request, and the router decodes no
                # tensor to convert one into the other.
                raise BadRequest(
                    f"step '{step.name}': send the pipeline's inputs as raw_input_contents (as tritonclient "
                    "does): this step mixes them with a step's raw output"
                )
        for model_output, _ in step.outputs:
            request.outputs.add(name=model_output)
        return request

    @contextlib.contextmanager
    def _observed(self, pipeline: Pipeline, step: Step) -> Iterator[None]:
        """A span per step (a child of the call's span, so the container's spans sit under it) and the
        per-step duration (labels bounded: registered pipelines and their steps only)."""
        telemetry = self.router.telemetry
        started = time.perf_counter()
        span_context: Any = (
            telemetry.tracer.start_as_current_span(
                f"pipeline step {step.name}",
                attributes={
                    "modelyard.pipeline": pipeline.name,
                    "modelyard.pipeline.version": pipeline.version,
                    "modelyard.step": step.name,
                    "modelyard.model": step.model,
                },
                record_exception=False,
                set_status_on_exception=False,
            )
            if telemetry is not None and telemetry.tracing and telemetry.tracer is not None
            else contextlib.nullcontext()
        )
        with span_context as span:
            try:
                yield
            except StepFailed as exc:
                if span is not None:
                    span.set_status(Status(StatusCode.ERROR, str(exc)))
                    span.set_attribute("rpc.grpc.status_code", exc.code.value[0])
                raise
            finally:
                if telemetry is not None and telemetry.metrics:
                    telemetry.pipeline_step_duration.record(
                        time.perf_counter() - started, {"pipeline": pipeline.name, "step": step.name}
                    )

    def _failed(self, pipeline: Pipeline, step: Step, code: grpc.StatusCode, details: str) -> StepFailed:
        return StepFailed(
            code, f"pipeline '{pipeline.name}' step '{step.name}' (model '{step.model}') failed: {details}"
        )

    async def _step(
        self,
        pipeline: Pipeline,
        step: Step,
        request_id: str,
        tensors: dict[str, Tensor],
        context: grpc.aio.ServicerContext,
    ) -> dict[str, Tensor]:
        # The step's own call record: forward_unary fills it in, the pipeline's call keeps its own.
        CURRENT_CALL.set(CallInfo("ModelInfer"))
        with self._observed(pipeline, step):
            request = self._step_request(step, request_id, tensors).SerializeToString()
            try:
                answer = await self.router.forward_unary(MODEL_INFER, request, context, admit=False)
            except ModelyardError as exc:
                raise self._failed(pipeline, step, exc.code, str(exc)) from exc
            except grpc.aio.AioRpcError as exc:
                raise self._failed(pipeline, step, exc.code(), exc.details() or exc.code().name) from exc
            response = kserve.ModelInferResponse.FromString(answer)
            return self._outputs(pipeline, step, response)

    def _outputs(self, pipeline: Pipeline, step: Step, response: Any) -> dict[str, Tensor]:
        wanted = dict(step.outputs)
        raw = response.raw_output_contents
        found: dict[str, Tensor] = {}
        for i, output in enumerate(response.outputs):
            tensor = wanted.get(output.name)
            if tensor is None:
                continue
            if i < len(raw):
                found[tensor] = Tensor(output.datatype, tuple(output.shape), raw[i])
            else:
                found[tensor] = Tensor(output.datatype, tuple(output.shape), None, output.contents)
        for model_output, tensor in step.outputs:
            if tensor not in found:
                raise self._failed(
                    pipeline, step, grpc.StatusCode.INTERNAL, f"its answer has no output '{model_output}'"
                )
        return found

    def _response(self, pipeline: Pipeline, message: Any, tensors: dict[str, Tensor]) -> Any:
        names = [o.name for o in message.outputs] or [t.name for t in pipeline.outputs]
        declared = {t.name for t in pipeline.outputs}
        response = kserve.ModelInferResponse(model_name=pipeline.name, model_version=pipeline.version)
        if message.id:
            response.id = message.id
        raw = all(tensors[n].raw is not None for n in names if n in tensors)
        for name in names:
            if name not in declared:
                raise BadRequest(
                    f"pipeline '{pipeline.name}' has no output '{name}' "
                    f"(outputs: {', '.join(sorted(declared))})"
                )
            tensor = tensors[name]
            entry = response.outputs.add(name=name, datatype=tensor.datatype, shape=list(tensor.shape))
            if raw:
                response.raw_output_contents.append(tensor.raw)
            else:
                entry.contents.CopyFrom(tensor.contents)
        return response

    async def _stream_last(
        self,
        pipeline: Pipeline,
        message: Any,
        step: Step,
        tensors: dict[str, Tensor],
        context: grpc.aio.ServicerContext,
    ) -> None:
        """The decoupled last step on a pooled upstream stream (router/stream.py); each response renamed."""
        # The step's own call record while it runs here, on the handler's task; the pipeline's comes back
        # before an error reaches the handler (which records its status there).
        token = CURRENT_CALL.set(CallInfo("InferStream"))
        try:
            await self._relay_last(pipeline, message, step, tensors, context)
        finally:
            CURRENT_CALL.reset(token)

    async def _relay_last(
        self,
        pipeline: Pipeline,
        message: Any,
        step: Step,
        tensors: dict[str, Tensor],
        context: grpc.aio.ServicerContext,
    ) -> None:
        router = self.router
        with self._observed(pipeline, step):
            request = self._step_request(step, message.id, tensors).SerializeToString()
            try:
                model, routed = router.route(request, context)
                container = await router.choose_copy(model, context)
                sink = Sink()
                pending = await router.streams.submit(
                    container,
                    model,
                    routed,
                    message.id,
                    sink=sink,
                    swallow_final=False,
                    timeout_s=router.upstream_timeout(context),
                )
            except ModelyardError as exc:  # UpstreamFailed among them
                raise self._failed(pipeline, step, exc.code, exc.details) from exc
            wanted = dict(step.outputs)
            try:
                while True:
                    try:
                        items = await sink.take()
                    except ModelyardError as exc:  # UpstreamFailed among them
                        raise self._failed(pipeline, step, exc.code, exc.details) from exc
                    for item in items:
                        assert isinstance(item, tuple)
                        data, info, _ = item
                        if info.error is not None:
                            error = ContainerStreamError(info.error)
                            raise self._failed(pipeline, step, error.code, info.error)
                        if info.inner is None:
                            raise self._failed(
                                pipeline,
                                step,
                                grpc.StatusCode.INTERNAL,
                                "the container sent an empty response",
                            )
                        start, stop = info.inner
                        inner = kserve.ModelInferResponse.FromString(data[start:stop])
                        await _write(context, self._renamed(pipeline, message, inner, wanted))
                        if info.final:
                            return
            finally:
                router.streams.abandon(pending)
                sink.close(asyncio.CancelledError())

    @staticmethod
    def _renamed(pipeline: Pipeline, message: Any, inner: Any, wanted: dict[str, str]) -> bytes:
        """A streamed response of the last step as the pipeline's: its name, its tensor names."""
        response = kserve.ModelInferResponse(model_name=pipeline.name, model_version=pipeline.version)
        if message.id:
            response.id = message.id
        for key, value in inner.parameters.items():
            response.parameters[key].CopyFrom(value)
        raw = inner.raw_output_contents
        for i, output in enumerate(inner.outputs):
            name = wanted.get(output.name)
            if name is None:
                continue
            entry = response.outputs.add(name=name, datatype=output.datatype, shape=list(output.shape))
            if i < len(raw):
                response.raw_output_contents.append(raw[i])
            else:
                entry.contents.CopyFrom(output.contents)
        return bytes(response.SerializeToString())
