"""Pipelines across containers (issue 14), end to end: specs registered with the real CLI, run by the
router over a real Triton and our own container, with tracing and metrics on.

One fleet serves the whole module (Triton start-up dominates): scale (x2), add_sub (dims -1) and stream
(decoupled) on Triton; triple (x3), features (a lookup table), predict (linear), secret (private to
acme) and doomed (removed by a test) on our container.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from tritonclient.grpc import service_pb2, service_pb2_grpc
from tritonclient.utils import InferenceServerException

from modelyard import metric_names
from modelyard.catalog.examples import EXAMPLES_DIR, install_example, install_model_dir
from modelyard.catalog.modelstore import LocalModelStore
from modelyard.catalog.registration import upload
from modelyard.local import LocalFleet
from modelyard.numpy_container.numpy_model import write_model_dir
from modelyard.placement import registry
from modelyard.placement.tenants import TenantLimits
from modelyard.router.server import RouterServer
from modelyard.telemetry import Telemetry
from modelyard.v1 import inference_pb2, router_pb2_grpc
from tests.conftest import require_triton
from tests.fleet import FleetThread

FEATURE_KEYS = np.array([303, 101, 202], dtype=np.int64)
FEATURE_TABLE = np.array([[3, 0, 1, 0], [1, 2, 0, 1], [0, 1, 2, 3]], dtype=np.float32)
W = np.array([[1.0], [10.0], [100.0], [1000.0]], dtype=np.float32)
B = np.array([0.5], dtype=np.float32)
VECTOR = [{"name": "INPUT", "datatype": "FP32", "shape": [-1]}]
VECTOR_OUT = [{"name": "OUTPUT", "datatype": "FP32", "shape": [-1]}]

FAN = """
name: fan                      # callable as a model
version: "1"
tenants: []                    # optional: private to these tenants
inputs:  [{name: X, datatype: FP32, shape: [-1]}]
outputs: [{name: Y, datatype: FP32, shape: [-1]}]
steps:
  - {name: thrice, model: triple,  inputs: {INPUT: X}, outputs: {OUTPUT: A}}
  - {name: twice,  model: scale,   inputs: {INPUT: X}, outputs: {OUTPUT: B}}
  - {name: sum,    model: add_sub, inputs: {INPUT0: A, INPUT1: B}, outputs: {OUTPUT0: Y}}
"""

SCORE = """
name: score
version: "1"
inputs:  [{name: ID, datatype: INT64, shape: [-1]}]
outputs: [{name: SCORE, datatype: FP32, shape: [-1, 1]}]
steps:
  - {name: fetch,   model: features, inputs: {INPUT: ID}, outputs: {OUTPUT: F}}
  - {name: predict, model: predict,  inputs: {INPUT: F},  outputs: {OUTPUT: SCORE}}
"""

TOKENS = """
name: tokens
version: "1"
inputs:  [{name: X, datatype: FP32, shape: [-1]}]
outputs: [{name: T, datatype: FP32, shape: [1]}]
steps:
  - {name: thrice, model: triple, inputs: {INPUT: X}, outputs: {OUTPUT: A}}
  - {name: emit,   model: stream, inputs: {INPUT: A}, outputs: {OUTPUT: T}}
"""


@dataclass
class Pipelines:
    thread: FleetThread
    workdir: Path
    spans: InMemorySpanExporter
    metrics: InMemoryMetricReader

    @property
    def address(self) -> str:
        return self.thread.address

    @property
    def store_url(self) -> str:
        return str(self.workdir / "store")

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "modelyard", *args, "--store", self.store_url],
            capture_output=True,
            text=True,
            timeout=60,
            env={**os.environ, "MODELYARD_MODEL_STORE": str(self.workdir / "artifacts")},
        )

    def register(self, name: str, spec: str) -> None:
        path = self.workdir / f"{name}.yaml"
        path.write_text(spec)
        done = self.cli("pipelines", "register", str(path), "--model-store", str(self.workdir / "artifacts"))
        assert done.returncode == 0, done.stderr
        table = self.thread.fleet.router.router.table  # type: ignore[union-attr]
        wait_for(lambda: name in table.fleet.pipelines_by_name, f"pipeline {name} in the router's table")


def wait_for(condition: Callable[[], bool], what: str, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


SLEEPY_S = 1.0
SLEEPY_CONFIG = """name: "sleepy"
backend: "python"
max_batch_size: 0
input [ { name: "INPUT" data_type: TYPE_FP32 dims: [ -1 ] } ]
output [ { name: "OUTPUT" data_type: TYPE_FP32 dims: [ -1 ] } ]
instance_group [ { kind: KIND_CPU count: 2 } ]
"""
SLEEPY_MODEL = f"""import time

import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def execute(self, requests):
        time.sleep({SLEEPY_S})  # a slow step, for the deadline test
        return [
            pb_utils.InferenceResponse(
                [pb_utils.Tensor("OUTPUT", pb_utils.get_input_tensor_by_name(r, "INPUT").as_numpy())]
            )
            for r in requests
        ]
"""
SLOW = """
name: slow
version: "1"
inputs:  [{name: X, datatype: FP32, shape: [-1]}]
outputs: [{name: Y, datatype: FP32, shape: [-1]}]
steps:
  - {name: first,  model: sleepy, inputs: {INPUT: X}, outputs: {OUTPUT: A}}
  - {name: second, model: sleepy, inputs: {INPUT: A}, outputs: {OUTPUT: Y}}
"""


def _sleepy(workdir: Path) -> Path:
    """A Triton python model that takes SLEEPY_S per call."""
    source = workdir / "sleepy"
    (source / "version").mkdir(parents=True)
    (source / "config.pbtxt").write_text(SLEEPY_CONFIG)
    (source / "version" / "model.py").write_text(SLEEPY_MODEL)
    return source


def _add_sub_any_length(workdir: Path) -> Path:
    """The add_sub example with dims -1 (the example takes exactly 4 values)."""
    source = workdir / "add_sub_any"
    shutil.copytree(EXAMPLES_DIR / "add_sub", source, ignore=shutil.ignore_patterns("__pycache__"))
    config = source / "config.pbtxt"
    config.write_text(config.read_text().replace("dims: [ 4 ]", "dims: [ -1 ]"))
    return source


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pipelines]:
    require_triton()
    workdir = tmp_path_factory.mktemp("pipelines")
    artifacts = workdir / "artifacts"
    thread = FleetThread(workdir, str(workdir / "store"), containers=1)
    thread.fleet.custom_containers = 1
    thread.fleet.model_store = workdir
    spans, metrics = InMemorySpanExporter(), InMemoryMetricReader()
    sources = workdir / "sources"

    def custom(name: str, op: str, weights: dict[str, np.ndarray], inputs: list, outputs: list) -> Path:
        return write_model_dir(sources / name, op, weights, inputs, outputs)

    async def setup(fleet: LocalFleet) -> None:
        await fleet.start_store_and_models(examples=False)
        store, model_store = fleet.store, LocalModelStore(artifacts)
        triton = [
            install_example("scale", artifacts),
            install_example("stream", artifacts),
            install_model_dir(_add_sub_any_length(workdir), artifacts, name="add_sub"),
            install_model_dir(_sleepy(workdir), artifacts, name="sleepy"),
        ]
        for model in triton:
            await registry.register_model(store, model)
        three, five, ten = (np.array([f], dtype=np.float32) for f in (3.0, 5.0, 10.0))
        ids = [{"name": "INPUT", "datatype": "INT64", "shape": [-1]}]
        rows = [{"name": "OUTPUT", "datatype": "FP32", "shape": [-1, 4]}]
        one = [{"name": "OUTPUT", "datatype": "FP32", "shape": [-1, 1]}]
        customs = {
            "triple": (custom("triple", "scale", {"factor": three}, VECTOR, VECTOR_OUT), ()),
            "doomed": (custom("doomed", "scale", {"factor": five}, VECTOR, VECTOR_OUT), ()),
            "secret": (custom("secret", "scale", {"factor": ten}, VECTOR, VECTOR_OUT), ("acme",)),
            "features": (
                custom("features", "lookup", {"keys": FEATURE_KEYS, "table": FEATURE_TABLE}, ids, rows),
                (),
            ),
            "predict": (
                custom("predict", "linear", {"W": W, "b": B}, [{**rows[0], "name": "INPUT"}], one),
                (),
            ),
        }
        registered = list(triton)
        for name, (source, tenants) in customs.items():
            result = await upload(store, model_store, source, name=name, version="1", tenants=tenants)
            registered.append(result.model)
        await fleet.start_containers()
        fleet.start_controller()
        telemetry = Telemetry("router", span_exporter=spans, metric_reader=metrics)
        fleet.router = RouterServer(
            store, port=0, telemetry=telemetry, fleet_secret=fleet.fleet_secret, follower=fleet.follower
        )
        await fleet.router.start()
        await fleet.wait_ready(registered, timeout_s=120)

    try:
        thread.start(setup)
        yield Pipelines(thread, workdir, spans, metrics)
    finally:
        thread.stop()


def infer(address: str, model: str, name: str, value: np.ndarray, tenant: str | None = None) -> np.ndarray:
    dtype = "INT64" if value.dtype == np.int64 else "FP32"
    tensor = grpcclient.InferInput(name, list(value.shape), dtype)
    tensor.set_data_from_numpy(value)
    headers = {"x-tenant-id": tenant} if tenant else None
    with grpcclient.InferenceServerClient(address) as client:
        result = client.infer(model, [tensor], headers=headers, client_timeout=30)
    response = result.get_response()
    assert response.model_name == model
    (output,) = response.outputs
    return result.as_numpy(output.name)


def refused(
    address: str, model: str, name: str, value: np.ndarray, tenant: str | None = None
) -> InferenceServerException:
    with pytest.raises(InferenceServerException) as caught:
        infer(address, model, name, value, tenant)
    return caught.value


def test_the_issue_s_fan_pipeline_runs_across_triton_and_our_container(fleet: Pipelines) -> None:
    fleet.register("fan", FAN)
    fleet.spans.clear()
    y = infer(fleet.address, "fan", "X", np.array([1, 2, 3], dtype=np.float32))
    np.testing.assert_array_equal(y, np.array([5, 10, 15], dtype=np.float32))

    # One trace: the call's span and one child span per step; the two independent steps overlapped.
    spans = fleet.spans.get_finished_spans()
    call = next(
        s
        for s in spans
        if s.name == "inference.GRPCInferenceService/ModelInfer"
        and s.attributes.get("modelyard.model") == "fan"
    )
    steps = {s.attributes["modelyard.step"]: s for s in spans if s.name.startswith("pipeline step ")}
    assert set(steps) == {"thrice", "twice", "sum"}
    for span in steps.values():
        assert span.context.trace_id == call.context.trace_id and span.parent.span_id == call.context.span_id
    thrice, twice, total = steps["thrice"], steps["twice"], steps["sum"]
    assert thrice.start_time < twice.end_time and twice.start_time < thrice.end_time  # concurrent
    assert total.start_time >= max(thrice.end_time, twice.end_time)  # after both its producers

    data = fleet.metrics.get_metrics_data()
    points = [
        p
        for r in data.resource_metrics
        for sm in r.scope_metrics
        for m in sm.metrics
        if metric_names.PIPELINE_STEP_DURATION.startswith(m.name)
        for p in m.data.data_points
    ]
    labelled = {(p.attributes["pipeline"], p.attributes["step"]) for p in points if p.count}
    assert {("fan", "thrice"), ("fan", "twice"), ("fan", "sum")} <= labelled


def test_a_pipeline_answers_metadata_ready_and_our_infer_like_a_model(fleet: Pipelines) -> None:
    fleet.register("fan", FAN)
    with grpc.insecure_channel(fleet.address) as channel:
        kserve = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        meta = kserve.ModelMetadata(service_pb2.ModelMetadataRequest(name="fan"), timeout=10)
        assert (meta.name, list(meta.versions)) == ("fan", ["1"])
        assert [(t.name, t.datatype, list(t.shape)) for t in meta.inputs] == [("X", "FP32", [-1])]
        assert [(t.name, t.datatype, list(t.shape)) for t in meta.outputs] == [("Y", "FP32", [-1])]
        assert kserve.ModelReady(service_pb2.ModelReadyRequest(name="fan"), timeout=10).ready
        index = kserve.RepositoryIndex(service_pb2.RepositoryIndexRequest(ready=True), timeout=10)
        assert ("fan", "1", "READY") in {(m.name, m.version, m.state) for m in index.models}
        x = np.array([2, -1], dtype=np.float32)
        request = inference_pb2.InferRequest(model_name="fan", id="r-7")
        request.inputs.add(name="X", datatype="FP32", shape=[2])
        request.raw_input_contents.append(x.tobytes())
        answer = router_pb2_grpc.RouterStub(channel).Infer(request, timeout=30)
    assert (answer.model_name, answer.id, answer.outputs[0].name) == ("fan", "r-7", "Y")
    np.testing.assert_array_equal(np.frombuffer(answer.raw_output_contents[0], np.float32), x * 5)


def test_look_up_features_by_id_then_predict(fleet: Pipelines) -> None:
    fleet.register("score", SCORE)
    ids = np.array([202, 303, 202], dtype=np.int64)
    rows = FEATURE_TABLE[[list(FEATURE_KEYS).index(i) for i in ids]]
    score = infer(fleet.address, "score", "ID", ids)
    np.testing.assert_allclose(score, rows @ W + B)


def test_a_failing_step_fails_the_call_with_its_status_naming_pipeline_step_and_model(
    fleet: Pipelines,
) -> None:
    fleet.register("score", SCORE)
    fleet.spans.clear()
    error = refused(fleet.address, "score", "ID", np.array([101, 999], dtype=np.int64))
    assert error.status() == "StatusCode.INVALID_ARGUMENT"
    message = error.message()
    assert "pipeline 'score' step 'fetch' (model 'features')" in message and "unknown key(s) 999" in message
    steps = [
        s.attributes["modelyard.step"]
        for s in fleet.spans.get_finished_spans()
        if "modelyard.step" in s.attributes
    ]
    assert steps == ["fetch"]  # the step after it never ran


def test_a_streaming_last_step_streams_through_infer_stream(fleet: Pipelines) -> None:
    fleet.register("tokens", TOKENS)
    x = np.array([1, 2, 3], dtype=np.float32)
    request = inference_pb2.InferRequest(model_name="tokens", id="s-1")
    request.inputs.add(name="X", datatype="FP32", shape=[3])
    request.raw_input_contents.append(x.tobytes())
    with grpc.insecure_channel(fleet.address) as channel:
        responses = list(router_pb2_grpc.RouterStub(channel).InferStream(request, timeout=30))
    data = [r for r in responses if r.outputs]
    assert [r.model_name for r in responses] == ["tokens"] * len(responses)
    assert [r.outputs[0].name for r in data] == ["T"] * 3
    assert [np.frombuffer(r.raw_output_contents[0], np.float32)[0] for r in data] == [3, 6, 9]
    assert responses[-1].parameters["triton_final_response"].bool_param
    # The unary call cannot return a stream: refused like a decoupled model's, not half answered.
    error = refused(fleet.address, "tokens", "X", x)
    assert error.status() == "StatusCode.INVALID_ARGUMENT" and "InferStream" in error.message()


@pytest.mark.parametrize(
    ("change", "words"),
    [
        (("INPUT1: B}", "INPUT1: C}"), ["step 'sum'", "tensor 'C'", "no step or pipeline input produces"]),
        (("{INPUT: X}, outputs: {OUTPUT: A}", "{INPUT: Y}, outputs: {OUTPUT: A}"), ["cycle", "tensor '"]),
        (("model: triple", "model: nosuch"), ["step 'thrice'", "tensor 'A'", "'nosuch' is not registered"]),
        (
            ("datatype: FP32, shape: [-1]}]\noutputs", "datatype: INT32, shape: [-1]}]\noutputs"),
            ["step 'thrice'", "tensor 'X' is INT32", "takes FP32"],
        ),
        (("name: broken ", "name: scale "), ["a model named 'scale' is registered"]),
    ],
    ids=["missing-producer", "cycle", "unknown-model", "signature-mismatch", "a-model-s-name"],
)
def test_an_invalid_spec_is_refused_with_one_line_and_nothing_is_registered(
    fleet: Pipelines, change: tuple[str, str], words: list[str]
) -> None:
    spec = FAN.replace("name: fan ", "name: broken ").replace(*change)
    assert spec != FAN.replace("name: fan ", "name: broken ")
    path = fleet.workdir / "broken.yaml"
    path.write_text(spec)
    done = fleet.cli("pipelines", "register", str(path))
    assert done.returncode == 2
    line = done.stderr.strip()
    assert "\n" not in line and line.startswith("error: ")
    for word in words:
        assert word in line, line
    listed = fleet.cli("pipelines", "list", "--json")
    assert listed.returncode == 0 and '"broken"' not in listed.stdout


def test_tenants_apply_to_the_pipeline_and_to_each_step_s_model(fleet: Pipelines) -> None:
    fleet.register(
        "fan_acme", FAN.replace("name: fan ", "name: fan_acme ").replace("tenants: []", "tenants: [acme]")
    )
    x = np.array([1, 2], dtype=np.float32)
    np.testing.assert_array_equal(infer(fleet.address, "fan_acme", "X", x, tenant="acme"), x * 5)
    hidden = refused(fleet.address, "fan_acme", "X", x, tenant="bob")
    never = refused(fleet.address, "never_registered", "X", x, tenant="bob")
    assert hidden.status() == never.status() == "StatusCode.NOT_FOUND"
    assert hidden.message().replace("fan_acme", "X") == never.message().replace("never_registered", "X")
    with grpc.insecure_channel(fleet.address) as channel:
        kserve = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        listed = {
            tenant: {
                m.name
                for m in kserve.RepositoryIndex(
                    service_pb2.RepositoryIndexRequest(), metadata=(("x-tenant-id", tenant),), timeout=10
                ).models
            }
            for tenant in ("acme", "bob")
        }
    assert "fan_acme" in listed["acme"] and "fan_acme" not in listed["bob"]

    # A public pipeline over a model private to acme: acme gets its answer, bob a NOT_FOUND naming the step.
    fleet.register(
        "tenfold",
        FAN.replace("name: fan ", "name: tenfold ")
        .replace("model: triple", "model: secret")
        .replace("{INPUT0: A, INPUT1: B}", "{INPUT0: A, INPUT1: A}"),
    )
    np.testing.assert_array_equal(infer(fleet.address, "tenfold", "X", x, tenant="acme"), x * 20)
    error = refused(fleet.address, "tenfold", "X", x, tenant="bob")
    assert error.status() == "StatusCode.NOT_FOUND"
    assert "pipeline 'tenfold' step 'thrice' (model 'secret')" in error.message()


def test_a_removed_step_model_fails_clearly_naming_the_step(fleet: Pipelines) -> None:
    spec = FAN.replace("name: fan ", "name: fragile ").replace("model: triple", "model: doomed")
    fleet.register("fragile", spec)
    x = np.array([1, 2], dtype=np.float32)
    np.testing.assert_array_equal(infer(fleet.address, "fragile", "X", x), x * 7)
    done = fleet.cli("models", "remove", "doomed@1")
    assert done.returncode == 0, done.stderr
    table = fleet.thread.fleet.router.router.table  # type: ignore[union-attr]
    wait_for(lambda: "doomed" not in table.fleet.by_name, "doomed unregistered in the router's table")
    error = refused(fleet.address, "fragile", "X", x)
    assert error.status() == "StatusCode.NOT_FOUND"
    assert "pipeline 'fragile' step 'thrice' (model 'doomed')" in error.message()
    assert "'doomed' is not registered" in error.message()


def test_bad_inputs_to_a_pipeline_are_invalid_argument_naming_the_tensor(fleet: Pipelines) -> None:
    fleet.register("fan", FAN)
    wrong_type = refused(fleet.address, "fan", "X", np.array([1, 2], dtype=np.int64))
    assert wrong_type.status() == "StatusCode.INVALID_ARGUMENT"
    assert "input 'X' is INT64 [2], the pipeline takes FP32 [-1]" in wrong_type.message()
    wrong_name = refused(fleet.address, "fan", "Z", np.array([1, 2], dtype=np.float32))
    assert wrong_name.status() == "StatusCode.INVALID_ARGUMENT"
    assert "pipeline 'fan' has no input 'Z'" in wrong_name.message()


def test_route_rules_and_explicit_versions_choose_the_pipeline_version(fleet: Pipelines) -> None:
    first = FAN.replace("name: fan ", "name: pinned ")
    second = first.replace('version: "1"', 'version: "2"').replace("INPUT1: B", "INPUT1: A")  # 3x + 3x
    fleet.register("pinned", first)
    path = fleet.workdir / "pinned-2.yaml"
    path.write_text(second)
    assert fleet.cli("pipelines", "register", str(path)).returncode == 0
    table = fleet.thread.fleet.router.router.table  # type: ignore[union-attr]
    wait_for(lambda: "2" in table.fleet.pipelines_by_name["pinned"], "pinned@2 in the router's table")
    x = np.array([1, 2], dtype=np.float32)
    np.testing.assert_array_equal(infer(fleet.address, "pinned", "X", x), x * 6)  # the highest version
    done = fleet.cli("routes", "set", "pinned", "--pin", "acme=1")
    assert done.returncode == 0, done.stderr
    wait_for(lambda: "pinned" in table.fleet.routes, "the route rule in the router's table")
    np.testing.assert_array_equal(infer(fleet.address, "pinned", "X", x, tenant="acme"), x * 5)
    np.testing.assert_array_equal(infer(fleet.address, "pinned", "X", x, tenant="bob"), x * 6)
    tensor = grpcclient.InferInput("X", [2], "FP32")
    tensor.set_data_from_numpy(x)
    with grpcclient.InferenceServerClient(fleet.address) as client:
        answer = client.infer("pinned", [tensor], model_version="1")
    assert answer.get_response().model_version == "1"
    np.testing.assert_array_equal(answer.as_numpy("Y"), x * 5)


def test_a_deadline_covers_the_whole_pipeline_not_each_step(fleet: Pipelines) -> None:
    """Two steps of SLEEPY_S each under a deadline of 1.5 x SLEEPY_S: each step alone would fit, the
    pipeline cannot. The caller's deadline is the router's default here (the caller set none): the router
    itself must stop the pipeline (a caller's own deadline would end the call in gRPC anyway)."""
    fleet.register("slow", SLOW)
    deadline_s = 1.5 * SLEEPY_S
    local = fleet.thread.fleet
    router = RouterServer(
        local.store,
        port=0,
        default_deadline_s=deadline_s,
        fleet_secret=local.fleet_secret,
        follower=local.follower,
    )
    fleet.thread.call(router.start())
    try:
        table = router.router.table
        wait_for(lambda: "slow" in table.fleet.pipelines_by_name, "the pipeline in the second router's table")
        x = np.array([1, 2], dtype=np.float32)
        request = inference_pb2.InferRequest(model_name="slow")
        request.inputs.add(name="X", datatype="FP32", shape=[2])
        request.raw_input_contents.append(x.tobytes())
        started = time.monotonic()
        with grpc.insecure_channel(router.address) as channel, pytest.raises(grpc.RpcError) as caught:
            router_pb2_grpc.RouterStub(channel).Infer(request)  # no deadline of its own
        elapsed = time.monotonic() - started
    finally:
        fleet.thread.call(router.stop())
    assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED, caught.value.details()
    assert "pipeline 'slow'" in (caught.value.details() or "")
    assert elapsed >= deadline_s


# -- signatures come from the registry, not from artifacts -------------------------------------------------

CHAIN = """
name: chain
version: "1"
inputs:  [{name: X, datatype: FP32, shape: [-1]}]
outputs: [{name: T, datatype: FP32, shape: [1]}]
steps:
  - {name: thrice, model: triple, inputs: {INPUT: X}, outputs: {OUTPUT: A}}
  - {name: emit,   model: emit,   inputs: {INPUT: A}, outputs: {OUTPUT: T}}
"""


def test_a_pipeline_registers_over_models_whose_artifacts_are_gone(tmp_path: Path) -> None:
    """Steps are checked against the signatures the registry holds since upload: with the model store's
    folder deleted after the uploads, `pipelines register` (pointed at an empty model store) still checks
    every step, finds the decoupled one, and refuses a mismatch. Reading artifacts, it could not."""
    artifacts, empty = tmp_path / "artifacts", tmp_path / "empty"

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "modelyard", *args, "--store", str(tmp_path / "store")],
            capture_output=True,
            text=True,
            timeout=60,
            env={**os.environ, "MODELYARD_MODEL_STORE": str(empty)},
        )

    sources = {
        "triple": write_model_dir(
            tmp_path / "src" / "triple",
            "scale",
            {"factor": np.array([3.0], dtype=np.float32)},
            VECTOR,
            VECTOR_OUT,
        ),
        "emit": write_model_dir(
            tmp_path / "src" / "emit", "stream", None, VECTOR, [{**VECTOR_OUT[0], "shape": [1]}]
        ),
    }
    for name, source in sources.items():
        done = cli(
            "models", "upload", str(source), "--name", name, "--version", "1", "--model-store", str(artifacts)
        )
        assert done.returncode == 0, done.stderr
    shutil.rmtree(artifacts)
    shutil.rmtree(tmp_path / "src")

    spec = tmp_path / "chain.yaml"
    spec.write_text(CHAIN)
    done = cli("pipelines", "register", str(spec), "--model-store", str(empty))
    assert done.returncode == 0, done.stderr
    assert "it streams" in done.stdout  # emit's decoupled flag, from the registry

    bad = tmp_path / "bad.yaml"
    bad.write_text(
        CHAIN.replace("name: chain", "name: bad").replace(
            "{name: X, datatype: FP32", "{name: X, datatype: INT32"
        )
    )
    done = cli("pipelines", "register", str(bad), "--model-store", str(empty))
    assert done.returncode == 2
    assert "thrice" in done.stderr and "cannot read the signature" not in done.stderr, done.stderr


# -- tenant limits ---------------------------------------------------------------------------------------

HELD = """
name: held
version: "1"
inputs:  [{name: X, datatype: FP32, shape: [-1]}]
outputs: [{name: Y, datatype: FP32, shape: [-1]}]
steps:
  - {name: nap, model: sleepy, inputs: {INPUT: X}, outputs: {OUTPUT: Y}}
"""


def test_a_pipeline_call_is_one_admission_for_all_its_steps(fleet: Pipelines) -> None:
    """With one call in flight allowed, a three-step pipeline runs (its steps are not admitted again), and
    a second pipeline call while one is in flight is refused RESOURCE_EXHAUSTED and counted in the metric."""
    fleet.register("fan", FAN)
    fleet.register("held", HELD)
    router = fleet.thread.fleet.router
    assert router is not None
    admission = router.router.admission

    async def limit(limits: TenantLimits | None) -> None:
        store, key = fleet.thread.fleet.store, registry.tenant_key("solo")
        if limits is None:
            await store.delete(key)
        else:
            await registry.put_tenant_limits(store, "solo", limits, await store.get(key))
        follower = router.router.follower
        while admission.fleet_limits.get("solo") != limits:
            await follower.wait_changed(5, follower.version)

    fleet.thread.call(limit(TenantLimits(max_inflight=1)))
    try:
        x = np.array([1, 2], dtype=np.float32)
        np.testing.assert_array_equal(infer(fleet.address, "fan", "X", x, tenant="solo"), x * 5)
        held: list[np.ndarray] = []
        holder = threading.Thread(target=lambda: held.append(infer(fleet.address, "held", "X", x, "solo")))
        holder.start()
        wait_for(lambda: admission.inflight("solo") == 1, "the held pipeline call admitted")
        error = refused(fleet.address, "fan", "X", x, tenant="solo")
        holder.join(30)
        assert error.status() == "StatusCode.RESOURCE_EXHAUSTED"
        assert "limit of 1 calls in flight" in str(error)
        np.testing.assert_array_equal(held[0], x)
    finally:
        fleet.thread.call(limit(None))
    data = fleet.metrics.get_metrics_data()
    refusals = [
        p
        for r in data.resource_metrics
        for sm in r.scope_metrics
        for m in sm.metrics
        if metric_names.REFUSED.startswith(m.name)
        for p in m.data.data_points
    ]
    assert [(dict(p.attributes), p.value) for p in refusals] == [({"tenant": "solo", "limit": "inflight"}, 1)]
