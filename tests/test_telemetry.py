"""Traces across router -> container, and the router's /metrics as Prometheus scrapes it."""

from __future__ import annotations

import asyncio
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from opentelemetry.proto.collector.metrics.v1 import metrics_service_pb2, metrics_service_pb2_grpc
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from prometheus_client.parser import text_string_to_metric_families
from tritonclient.utils import InferenceServerException

from modelyard import metric_names as names
from modelyard.containers.agent import Agent
from modelyard.containers.custom.adapter import CustomAdapter
from modelyard.containers.triton.server import free_port
from modelyard.numpy_container.container import CustomContainer
from modelyard.placement import registry
from modelyard.placement.model import Container
from modelyard.router.server import RouterServer
from modelyard.telemetry import Telemetry
from tests.conftest import stop_process
from tests.fleet import FleetThread
from tests.test_lazy_load import scale_model

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
CLIENT_SPAN = "00f067aa0ba902b7"


class TracedFleet:
    """Router and our container in this process, each with its own telemetry writing to one exporter."""

    def __init__(self, tmp_path: Path) -> None:
        self.spans = InMemorySpanExporter()
        self.agent_metrics = InMemoryMetricReader()
        self.thread = FleetThread(tmp_path, str(tmp_path / "store"), containers=0)
        self.router: RouterServer | None = None

    async def start(self, tmp_path: Path) -> None:
        fleet = self.thread.fleet
        await fleet.start_store_and_models(examples=False)
        self.container = CustomContainer(1 << 30, telemetry=Telemetry("container", span_exporter=self.spans))
        await self.container.start()
        self.adapter = CustomAdapter(self.container.address)
        box = Container("box", self.container.address, memory_bytes=1 << 30, backend="custom")
        self.agent = Agent(
            fleet.store, box, self.adapter, telemetry=Telemetry("agent", metric_reader=self.agent_metrics)
        )
        fleet._tasks.append(asyncio.get_running_loop().create_task(self.agent.run()))
        model = scale_model(tmp_path / "models", "m", 2.0)
        await registry.register_model(fleet.store, model)
        await registry.write_shard_map(fleet.store, {model.key: ["box"]}, expected_generation=0)
        self.router = RouterServer(
            fleet.store, port=0, telemetry=Telemetry("router", span_exporter=self.spans)
        )
        fleet.router = self.router
        await self.router.start()
        await fleet.wait_ready([model], timeout_s=30)

    async def stop(self) -> None:
        await self.container.stop()
        await self.adapter.close()


@pytest.fixture
def traced(tmp_path: Path) -> Iterator[TracedFleet]:
    fleet = TracedFleet(tmp_path)
    try:
        fleet.thread.call(fleet.start(tmp_path))
        yield fleet
    finally:
        fleet.thread.call(fleet.stop())
        fleet.thread.stop()


def test_a_routed_call_is_one_trace_from_client_to_container(traced: TracedFleet) -> None:
    assert traced.router is not None
    tensor = grpcclient.InferInput("INPUT", [2], "FP32")
    tensor.set_data_from_numpy(np.array([1.0, 3.0], dtype=np.float32))
    headers = {"traceparent": f"00-{TRACE_ID}-{CLIENT_SPAN}-01", "x-tenant-id": "acme"}
    with grpcclient.InferenceServerClient(traced.router.address) as client:
        out = client.infer("m", [tensor], headers=headers).as_numpy("OUTPUT")
    np.testing.assert_allclose(out, [2.0, 6.0])
    # OpenTelemetry's RPC conventions: the span is named service/method and says so in rpc.* attributes.
    spans = [
        s for s in traced.spans.get_finished_spans() if s.name == "inference.GRPCInferenceService/ModelInfer"
    ]
    by_service = {s.resource.attributes["service.name"]: s for s in spans}
    router_span, container_span = by_service["router"], by_service["container"]
    assert f"{router_span.context.trace_id:032x}" == TRACE_ID == f"{container_span.context.trace_id:032x}"
    assert (
        f"{router_span.parent.span_id:016x}" == CLIENT_SPAN
    )  # the client's span is the router span's parent
    assert container_span.parent.span_id == router_span.context.span_id  # and the router's is the container's
    assert router_span.attributes["modelyard.model"] == "m"
    assert router_span.attributes["modelyard.version"] == "1"
    assert router_span.attributes["modelyard.tenant"] == "acme"
    assert router_span.attributes["modelyard.container"] == "box"
    assert router_span.attributes["modelyard.retries"] == 0
    for span in (router_span, container_span):
        assert span.attributes["rpc.system"] == "grpc"
        assert span.attributes["rpc.service"] == "inference.GRPCInferenceService"
        assert span.attributes["rpc.method"] == "ModelInfer"
    assert (
        router_span.attributes["rpc.grpc.status_code"]
        == container_span.attributes["rpc.grpc.status_code"]
        == 0
    )


def test_a_failed_call_records_its_status_on_the_span(traced: TracedFleet) -> None:
    assert traced.router is not None
    tensor = grpcclient.InferInput("INPUT", [1], "FP32")
    tensor.set_data_from_numpy(np.ones(1, dtype=np.float32))
    with (
        grpcclient.InferenceServerClient(traced.router.address) as client,
        pytest.raises(InferenceServerException),
    ):
        client.infer("nope", [tensor])
    deadline = time.monotonic() + 5  # the span ends just after the status reaches the client
    while not (
        failed := [s for s in traced.spans.get_finished_spans() if s.attributes["modelyard.model"] == "nope"]
    ):
        assert time.monotonic() < deadline
        time.sleep(0.01)
    assert failed[0].attributes["rpc.grpc.status_code"] == grpc.StatusCode.NOT_FOUND.value[0] == 5
    assert failed[0].resource.attributes["service.name"] == "router"


def test_the_agent_counts_its_loads(traced: TracedFleet) -> None:
    data = traced.agent_metrics.get_metrics_data()
    points = {
        metric.name: list(metric.data.data_points)
        for resource in data.resource_metrics
        for scope in resource.scope_metrics
        for metric in scope.metrics
    }
    loads = points[names.AGENT_LOADS.removesuffix("_total")]
    assert [(p.attributes["outcome"], p.value) for p in loads] == [("ready", 1)]
    assert points[names.AGENT_LOAD_DURATION.removesuffix("_seconds")][0].count == 1


@pytest.fixture
def served_router(tmp_path: Path) -> Iterator[tuple[str, str, FleetThread]]:
    """`modelyard serve --metrics-port` as a process, on a fleet with one of our containers and a model."""
    thread = FleetThread(tmp_path / "fleet", str(tmp_path / "fleet" / "store"), containers=0)
    thread.fleet.custom_containers = 1

    async def setup(fleet) -> None:  # type: ignore[no-untyped-def]
        await fleet.start_store_and_models(examples=False)
        model = scale_model(tmp_path / "models", "m", 2.0)
        await registry.register_model(fleet.store, model)
        await fleet.start_containers()
        fleet.start_controller()
        await fleet.start_router()
        await fleet.wait_ready([model], timeout_s=60)

    port, metrics_port = free_port(), free_port()
    process = None
    try:
        thread.start(setup)
        process = subprocess.Popen(
            [sys.executable, "-m", "modelyard", "serve", "--store", thread.fleet.store_url,
             "--port", str(port), "--metrics-port", str(metrics_port),
             "--fleet-secret-file", str(thread.fleet.fleet_secret_file)],
            start_new_session=True,
        )  # fmt: skip
        yield f"127.0.0.1:{port}", f"http://127.0.0.1:{metrics_port}/metrics", thread
    finally:
        if process is not None:
            stop_process(process)  # type: ignore[arg-type]
        thread.stop()


def scrape(url: str) -> dict[str, list[tuple[dict[str, str], float]]]:
    """Sample name -> (labels, value) for every sample /metrics shows."""
    with urllib.request.urlopen(url, timeout=5) as response:
        text = response.read().decode()
    out: dict[str, list[tuple[dict[str, str], float]]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out.setdefault(sample.name, []).append((dict(sample.labels), sample.value))
    return out


def test_metrics_endpoint_reports_requests_latency_and_the_fleet(served_router) -> None:  # type: ignore[no-untyped-def]
    address, url, _ = served_router
    tensor = grpcclient.InferInput("INPUT", [2], "FP32")
    tensor.set_data_from_numpy(np.array([1.0, 2.0], dtype=np.float32))
    with grpcclient.InferenceServerClient(address) as client:
        deadline = time.monotonic() + 30
        while True:
            try:
                client.infer("m", [tensor], client_timeout=10)
                break
            except InferenceServerException:
                assert time.monotonic() < deadline
                time.sleep(0.1)
        for _ in range(4):
            client.infer("m", [tensor])
        with pytest.raises(InferenceServerException):
            client.infer("nope", [tensor])
    # The router records a call after its answer has gone out: on a busy machine a scrape can come first.
    deadline = time.monotonic() + 30
    while True:
        metrics = scrape(url)
        requests = {
            (s["model"], s["code"]): v
            for s, v in metrics.get(names.REQUESTS, [])
            if s["method"] == "ModelInfer"
        }
        if (
            requests.get(("m", "OK")) == 5 and ("other", "NOT_FOUND") in requests
        ) or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert requests[("m", "OK")] == 5
    assert requests[("other", "NOT_FOUND")] == 1  # names nobody registered share one label value
    count = next(v for s, v in metrics[names.REQUEST_DURATION + "_count"] if s["model"] == "m")
    assert count == 5
    buckets = [v for s, v in metrics[names.REQUEST_DURATION + "_bucket"] if s["model"] == "m"]
    assert buckets == sorted(buckets) and buckets[-1] == 5
    assert metrics[names.SHARD_MAP_GENERATION][0][1] >= 1
    assert metrics[names.STORE_REACHABLE][0][1] == 1
    assert metrics[names.CACHE_HITS][0][1] >= 5  # the model was ready before the first call
    # Fleet-wide gauges come from the leading controller only (placement/metrics.py), not from each router.
    fleet_gauges = {names.COPIES, names.UNPLACED_MODELS, names.CONTAINER_MEMORY, names.CONTROLLER_LEADER}
    assert not fleet_gauges & set(metrics)
    router_metrics = {
        names.REQUESTS,
        names.REQUEST_DURATION,
        names.IN_FLIGHT,
        names.SHARD_MAP_GENERATION,
        names.WATCH_LAG,
        names.STORE_REACHABLE,
        names.CACHE_HITS,
        names.CACHE_MISSES,
    }
    present = {name.removesuffix("_bucket") for name in metrics} | set(metrics)
    missing = {n for n in router_metrics if n not in present and n + "_bucket" not in metrics}
    assert not missing
    with urllib.request.urlopen(url.replace("/metrics", "/readyz"), timeout=5) as response:
        assert response.status == 200  # its routing table is loaded


def test_a_standby_controller_reports_it_does_not_lead_and_no_fleet_gauges(served_router) -> None:  # type: ignore[no-untyped-def]
    _, _, thread = served_router  # its fleet runs the leading controller in process
    metrics_port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "modelyard", "controller", "--store", thread.fleet.store_url,
         "--metrics-port", str(metrics_port)],
        start_new_session=True,
    )  # fmt: skip
    try:
        base = f"http://127.0.0.1:{metrics_port}"
        deadline = time.monotonic() + 30
        while True:  # /readyz: 200 once it follows the store
            try:
                with urllib.request.urlopen(base + "/readyz", timeout=5) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            assert process.poll() is None and time.monotonic() < deadline
            time.sleep(0.2)
        metrics = scrape(base + "/metrics")
        assert [v for _, v in metrics[names.CONTROLLER_LEADER]] == [0.0]
        fleet_gauges = {names.COPIES, names.UNPLACED_MODELS, names.CONTAINER_MEMORY}
        assert not fleet_gauges & set(metrics)
    finally:
        stop_process(process)  # type: ignore[arg-type]


def test_our_container_serves_its_memory_on_metrics(tmp_path: Path) -> None:
    port, metrics_port = free_port(), free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "modelyard", "container", "--port", str(port), "--memory-bytes", "1000000",
         "--metrics-port", str(metrics_port), "--model-store", str(tmp_path)],
        start_new_session=True,
    )  # fmt: skip
    try:
        adapter_model = scale_model(tmp_path, "m", 2.0)

        async def load() -> None:
            adapter = CustomAdapter(f"127.0.0.1:{port}")
            try:
                deadline = time.monotonic() + 20
                while not await adapter.live():
                    assert time.monotonic() < deadline
                    await asyncio.sleep(0.1)
                await adapter.load(adapter_model)
            finally:
                await adapter.close()

        asyncio.run(load())
        metrics = scrape(f"http://127.0.0.1:{metrics_port}/metrics")
        memory = {s["kind"]: v for s, v in metrics[names.CONTAINER_MEMORY]}
        assert memory == {"capacity": 1_000_000, "used": 4}  # one float32 factor
    finally:
        stop_process(process)  # type: ignore[arg-type]


class Collector(metrics_service_pb2_grpc.MetricsServiceServicer):
    """An OTLP metrics receiver on loopback: what an OpenTelemetry Collector would be sent."""

    def __init__(self) -> None:
        self.received: list[metrics_service_pb2.ExportMetricsServiceRequest] = []
        self.arrived = threading.Event()

    def Export(self, request, context):  # type: ignore[no-untyped-def]
        self.received.append(request)
        self.arrived.set()
        return metrics_service_pb2.ExportMetricsServiceResponse()


def test_with_an_otlp_endpoint_metrics_are_pushed_under_otel_service_name(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    collector = Collector()
    server = grpc.server(ThreadPoolExecutor(2))
    metrics_service_pb2_grpc.add_MetricsServiceServicer_to_server(collector, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", f"http://127.0.0.1:{port}")
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_INSECURE", "true")
    monkeypatch.setenv("OTEL_METRIC_EXPORT_INTERVAL", "200")
    monkeypatch.setenv("OTEL_SERVICE_NAME", "router-eu-1")
    telemetry = Telemetry("modelyard-router")  # no --metrics-port: OTLP alone turns metrics on
    try:
        assert telemetry.metrics and telemetry.metrics_port is None
        telemetry.requests.add(1, {"method": "ModelInfer", "model": "m", "tenant": "acme", "code": "OK"})
        assert collector.arrived.wait(30), "nothing exported within 30 s"
    finally:
        telemetry.shutdown()
        server.stop(None)
    request = collector.received[0]
    resource = {a.key: a.value.string_value for a in request.resource_metrics[0].resource.attributes}
    assert resource["service.name"] == "router-eu-1"
    exported = {m.name for rm in request.resource_metrics for sm in rm.scope_metrics for m in sm.metrics}
    assert names.REQUESTS.removesuffix("_total") in exported


@pytest.mark.parametrize("command", [["controller"], ["serve", "--port", "0"]])
def test_a_metrics_port_in_use_ends_the_command_with_one_clear_line(
    command: list[str], tmp_path: Path
) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = subprocess.run(
            [sys.executable, "-m", "modelyard", *command, "--store", str(tmp_path / "store"),
             "--metrics-port", str(port)],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
    assert result.returncode != 0
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: cannot serve metrics on 127.0.0.1:{port}"), result.stderr
    assert "Traceback" not in result.stderr
