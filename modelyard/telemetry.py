"""OpenTelemetry for modelyard processes: a server span per routed call, W3C trace context passed on to the
container, and metrics exposed for Prometheus on /metrics.

Configuration (flags override), OpenTelemetry's standard variables honoured:
- MODELYARD_TRACES = none (default) | console | otlp, else OTEL_TRACES_EXPORTER (the same values); otlp sends
  to OTEL_EXPORTER_OTLP_[TRACES_]ENDPOINT with the other OTEL_EXPORTER_OTLP_* settings; OTEL_TRACES_SAMPLER
  and its _ARG choose what is sampled.
- OTEL_SERVICE_NAME (or service.name in OTEL_RESOURCE_ATTRIBUTES) names the service instead of modelyard's
  name for the process; the rest of OTEL_RESOURCE_ATTRIBUTES is added to every span and metric.
- Metrics are also pushed over OTLP when OTEL_METRICS_EXPORTER=otlp, or when it is unset and an OTLP
  endpoint is (OTEL_EXPORTER_OTLP_[METRICS_]ENDPOINT), every OTEL_METRIC_EXPORT_INTERVAL ms.
- MODELYARD_METRICS_PORT = port for /metrics (default: off); MODELYARD_METRICS_HOST (default 127.0.0.1).
  The same plaintext port answers /healthz (the process is up) and /readyz (it is ready), so probes work
  when the gRPC port requires client certificates.

Providers are per process object (not OpenTelemetry's globals), so several routers or containers can run
in one test process. With traces and metrics off, a call costs one attribute check.
"""

from __future__ import annotations

import contextvars
import os
import socketserver
import threading
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

import grpc
from opentelemetry.context import Context
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import MetricReader
from opentelemetry.sdk.metrics.view import ExplicitBucketHistogramAggregation, View
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import (
    BatchSpanProcessor,
    ConsoleSpanExporter,
    SimpleSpanProcessor,
    SpanExporter,
)
from opentelemetry.trace import SpanKind, Tracer
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from modelyard import metric_names as names

TRACE_HEADERS = ("traceparent", "tracestate")
# Seconds: from sub-millisecond hops to multi-second loads.
DURATION_BUCKETS_S = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
# How long an evicted copy had been loaded: from a thrashing second to a day.
AGE_BUCKETS_S = (1, 10, 60, 300, 900, 1800, 3600, 3 * 3600, 6 * 3600, 12 * 3600, 24 * 3600)
_PROPAGATOR = TraceContextTextMapPropagator()


@dataclass
class CallInfo:
    """What a routed call turned out to be; filled in by the routing core, read when the call ends."""

    method: str
    model: str = ""
    version: str = ""
    tenant: str = ""
    container: str = ""
    retries: int = 0
    code: str = "OK"
    # Metric labels: bounded. A model the caller may not see or a tenant nobody configured is `other`;
    # spans carry the names as sent (`model`, `tenant`).
    model_label: str = ""
    tenant_label: str = ""


OTHER_LABEL = "other"  # the metric label of every model and tenant the router does not know

CURRENT_CALL: contextvars.ContextVar[CallInfo | None] = contextvars.ContextVar("modelyard_call", default=None)


def current_call() -> CallInfo | None:
    return CURRENT_CALL.get()


def status_code_number(name: str) -> int:
    """A gRPC status code's number from its name (OpenTelemetry's rpc.grpc.status_code is the number);
    UNKNOWN's for a name that is none."""
    code = grpc.StatusCode.__members__.get(name, grpc.StatusCode.UNKNOWN)
    return int(code.value[0])


def _resource(service: str) -> Resource:
    """OTEL_SERVICE_NAME and OTEL_RESOURCE_ATTRIBUTES as the SDK reads them; `service` when they name none."""
    from opentelemetry.sdk.resources import OTELResourceDetector

    named = "service.name" in OTELResourceDetector().detect().attributes
    return Resource.create({} if named else {"service.name": service})


def _otlp_metrics() -> bool:
    exporter = os.environ.get("OTEL_METRICS_EXPORTER", "").strip().lower()
    if exporter:
        return exporter == "otlp"
    return bool(
        os.environ.get("OTEL_EXPORTER_OTLP_METRICS_ENDPOINT") or os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT")
    )


def _base(name: str, *suffixes: str) -> str:
    """The OpenTelemetry instrument name whose Prometheus export is `name` (the exporter adds suffixes)."""
    for suffix in suffixes:
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


class Telemetry:
    def __init__(
        self,
        service: str,
        *,
        traces: str | None = None,
        span_exporter: SpanExporter | None = None,
        metrics_port: int | None = None,
        metric_reader: MetricReader | None = None,
        metrics_host: str = "127.0.0.1",
    ) -> None:
        """`traces`: none, console or otlp; `metrics_port`: serve /metrics there (None: not at all)."""
        traces = (traces or "none").lower()
        if traces not in ("none", "console", "otlp"):
            raise ValueError(
                f"MODELYARD_TRACES (or OTEL_TRACES_EXPORTER) must be none, console or otlp, got {traces!r}"
            )
        self.metrics_host = metrics_host
        resource = _resource(service)
        self.tracing = span_exporter is not None or traces != "none"
        self.tracer: Tracer | None = None
        if self.tracing:
            provider = TracerProvider(resource=resource)
            if span_exporter is not None:
                provider.add_span_processor(SimpleSpanProcessor(span_exporter))
            elif traces == "console":
                provider.add_span_processor(BatchSpanProcessor(ConsoleSpanExporter()))
            else:
                from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

                provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
            self._tracer_provider = provider
            self.tracer = provider.get_tracer("modelyard")
        otlp_metrics = metric_reader is None and _otlp_metrics()
        self.metrics = metric_reader is not None or metrics_port is not None or otlp_metrics
        self.http: MetricsServer | None = None
        self.metrics_port = metrics_port
        self.enabled = self.tracing or self.metrics
        if not self.metrics:
            return
        readers: list[MetricReader] = []
        if metric_reader is not None:
            readers.append(metric_reader)
        if metrics_port is not None:
            from opentelemetry.exporter.prometheus import PrometheusMetricReader

            readers.append(PrometheusMetricReader())
        if otlp_metrics:  # pushed to a collector as well as (or instead of) scraped on /metrics
            from opentelemetry.exporter.otlp.proto.grpc.metric_exporter import OTLPMetricExporter
            from opentelemetry.sdk.metrics.export import PeriodicExportingMetricReader

            readers.append(PeriodicExportingMetricReader(OTLPMetricExporter()))
        # Buckets per histogram (a histogram two views matched would be exported twice).
        age = _base(names.EVICTION_AGE, "_seconds")
        views = [
            View(instrument_name=age, aggregation=ExplicitBucketHistogramAggregation(AGE_BUCKETS_S)),
            *(
                View(instrument_name=name, aggregation=ExplicitBucketHistogramAggregation(DURATION_BUCKETS_S))
                for name in (
                    _base(n, "_seconds")
                    for n in (
                        names.REQUEST_DURATION,
                        names.LAZY_LOAD_DURATION,
                        names.PIPELINE_STEP_DURATION,
                        names.AGENT_LOAD_DURATION,
                        names.MODEL_LOAD,
                        names.COLD_CALL_WAIT,
                        names.RECONCILE,
                        names.QUEUE_WAIT,
                    )
                )
            ),
        ]
        self._meter_provider = MeterProvider(resource=resource, metric_readers=readers, views=views)
        meter = self._meter_provider.get_meter("modelyard")
        self.requests = meter.create_counter(_base(names.REQUESTS, "_total"), description="Routed calls")
        self.duration = meter.create_histogram(
            _base(names.REQUEST_DURATION, "_seconds"), unit="s", description="Routed call duration"
        )
        # Plain counters read at scrape time: an up-down counter would cost two SDK calls per request.
        self.in_flight: dict[str, int] = {}
        self.streams_open = 0
        self.retries = meter.create_counter(
            _base(names.RETRIES, "_total"), description="Calls sent to a second copy"
        )
        self.refused = meter.create_counter(
            _base(names.REFUSED, "_total"), description="Calls refused by a tenant limit or a full container"
        )
        self.queue_wait = meter.create_histogram(
            _base(names.QUEUE_WAIT, "_seconds"), unit="s", description="Wait for a container at its bound"
        )
        self.lazy_loads = meter.create_counter(_base(names.LAZY_LOADS, "_total"), description="Lazy loads")
        self.lazy_load_duration = meter.create_histogram(
            _base(names.LAZY_LOAD_DURATION, "_seconds"), unit="s", description="Lazy load wait"
        )
        self.pipeline_step_duration = meter.create_histogram(
            _base(names.PIPELINE_STEP_DURATION, "_seconds"), unit="s", description="Pipeline step duration"
        )
        self.agent_loads = meter.create_counter(_base(names.AGENT_LOADS, "_total"), description="Agent loads")
        self.agent_load_duration = meter.create_histogram(
            _base(names.AGENT_LOAD_DURATION, "_seconds"), unit="s", description="Agent load time"
        )
        # The control plane (ModelMesh's and SageMaker multi-model endpoints' figures): loads by backend,
        # what cold calls waited, evictions and the age of what was evicted, the controller's passes.
        self.model_load = meter.create_histogram(
            _base(names.MODEL_LOAD, "_seconds"), unit="s", description="Time a container took to load a model"
        )
        self.cold_call_wait = meter.create_histogram(
            _base(names.COLD_CALL_WAIT, "_seconds"), unit="s", description="What a call waited for a copy"
        )
        self.evictions = meter.create_counter(
            _base(names.EVICTIONS, "_total"), description="Ready copies an agent unloaded"
        )
        self.eviction_age = meter.create_histogram(
            _base(names.EVICTION_AGE, "_seconds"), unit="s", description="How long an evicted copy was loaded"
        )
        self.placement_failures = meter.create_counter(
            _base(names.PLACEMENT_FAILURES, "_total"),
            description="Models a placement pass could not place, and new copies that did not become ready",
        )
        self.reconcile = meter.create_histogram(
            _base(names.RECONCILE, "_seconds"), unit="s", description="Placement controller pass duration"
        )
        self._meter = meter
        self.gauge(
            names.IN_FLIGHT,
            lambda: [(n, {"method": m}) for m, n in self.in_flight.items()],
            "Calls in progress",
        )
        self.gauge(names.STREAMS_OPEN, lambda: [(self.streams_open, {})], "Streams open")

    def gauge(
        self, name: str, read: Callable[[], Iterable[tuple[float, dict[str, str]]]], description: str
    ) -> None:
        """An observable gauge read at scrape time: `read()` yields (value, attributes)."""
        if not self.metrics:
            return
        from opentelemetry.metrics import CallbackOptions, Observation

        def callback(options: CallbackOptions) -> Iterable[Observation]:
            return [Observation(value, attributes) for value, attributes in read()]

        self._meter.create_observable_gauge(name, callbacks=[callback], description=description)

    def counter(
        self, name: str, read: Callable[[], Iterable[tuple[float, dict[str, str]]]], description: str
    ) -> None:
        """A monotonic counter kept by the caller (a plain int) and read at scrape time: cheaper on a hot
        path than an SDK counter's add()."""
        if not self.metrics:
            return
        from opentelemetry.metrics import CallbackOptions, Observation

        def callback(options: CallbackOptions) -> Iterable[Observation]:
            return [Observation(value, attributes) for value, attributes in read()]

        self._meter.create_observable_counter(
            _base(name, "_total"), callbacks=[callback], description=description
        )

    def serve_metrics(self, host: str | None = None, ready: Callable[[], bool] | None = None) -> int | None:
        """Starts the plaintext HTTP endpoint if a port is configured: /metrics (Prometheus text),
        /healthz (200 while the process serves) and /readyz (200 once `ready()` says so; always without
        it). Returns the port it listens on (a free one for port 0)."""
        if self.metrics_port is None:
            return None
        self.http = MetricsServer(host or self.metrics_host, self.metrics_port)
        self.http.ready = ready
        self.metrics_port = self.http.port
        return self.metrics_port

    # -- tracing helpers ----------------------------------------------------------------------------

    def extract(self, metadata: Sequence[Any] | None) -> Context | None:
        carrier = {m.key: m.value for m in metadata or () if m.key in TRACE_HEADERS}
        return _PROPAGATOR.extract(carrier) if carrier else None

    def start_server_span(self, name: str, metadata: Sequence[Any] | None, *, service: str = "") -> Any:
        """A server span for the gRPC method `name` of `service`, named and described as OpenTelemetry's
        RPC conventions say (`inference.GRPCInferenceService/ModelInfer`, rpc.system/service/method)."""
        assert self.tracer is not None
        attributes = {"rpc.system": "grpc", "rpc.method": name}
        if service:
            attributes["rpc.service"] = service
        return self.tracer.start_as_current_span(
            f"{service}/{name}" if service else name,
            context=self.extract(metadata),
            kind=SpanKind.SERVER,
            attributes=attributes,
        )

    @staticmethod
    def inject() -> list[tuple[str, str]]:
        """The current span's trace context as gRPC metadata for the next hop."""
        carrier: dict[str, str] = {}
        _PROPAGATOR.inject(carrier)
        return list(carrier.items())

    def shutdown(self) -> None:
        if self.http is not None:
            self.http.close()
        if self.tracing:
            self._tracer_provider.shutdown()
        if self.metrics:
            self._meter_provider.shutdown()


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        pass  # scrapes and probes every few seconds: not worth a log line each


class _ThreadingServer(socketserver.ThreadingMixIn, WSGIServer):
    daemon_threads = True  # a scrape in progress does not hold up the process's exit


class MetricsPortError(OSError):
    """The metrics port cannot be listened on (in use, no permission): a user's error, said in one line."""


class MetricsServer:
    """The plaintext HTTP port of a modelyard process, in a daemon thread: /metrics for Prometheus and
    /healthz, /readyz for the kubelet (whose gRPC probes cannot present a client certificate)."""

    def __init__(self, host: str, port: int) -> None:
        from prometheus_client import REGISTRY, make_wsgi_app

        self.ready: Callable[[], bool] | None = None
        self._metrics = make_wsgi_app(REGISTRY)
        try:
            self._server: WSGIServer = make_server(
                host, port, self._app, server_class=_ThreadingServer, handler_class=_QuietHandler
            )
        except OSError as exc:
            raise MetricsPortError(f"cannot serve metrics on {host}:{port}: {exc.strerror or exc}") from exc
        self.port = int(self._server.server_address[1])
        self._thread = threading.Thread(target=self._server.serve_forever, name="metrics-http", daemon=True)
        self._thread.start()

    def _app(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        path = environ.get("PATH_INFO", "")
        if path == "/healthz":
            return self._text(start_response, True, b"ok\n")
        if path == "/readyz":
            ready = self.ready is None or bool(self.ready())
            return self._text(start_response, ready, b"ready\n" if ready else b"not ready\n")
        return self._metrics(environ, start_response)

    @staticmethod
    def _text(start_response: Callable[..., Any], ok: bool, body: bytes) -> list[bytes]:
        status = "200 OK" if ok else "503 Service Unavailable"
        start_response(status, [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))])
        return [body]

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
