"""OpenTelemetry for modelyard processes: a server span per routed call, W3C trace context passed on to the
container, and metrics exposed for Prometheus on /metrics.

Configuration (flags override):
- MODELYARD_TRACES = none (default) | console | otlp   (otlp uses the standard OTEL_EXPORTER_OTLP_* env vars)
- MODELYARD_METRICS_PORT = port for /metrics (default: off); MODELYARD_METRICS_HOST (default 127.0.0.1)

Providers are per process object (not OpenTelemetry's globals), so several routers or containers can run
in one test process. With traces and metrics off, a call costs one attribute check.
"""

from __future__ import annotations

import contextvars
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

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
            raise ValueError(f"MODELYARD_TRACES must be none, console or otlp, got {traces!r}")
        self.metrics_host = metrics_host
        resource = Resource.create({"service.name": service})
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
        self.metrics = metric_reader is not None or metrics_port is not None
        self.metrics_port = metrics_port
        self.enabled = self.tracing or self.metrics
        if not self.metrics:
            return
        if metric_reader is None:
            from opentelemetry.exporter.prometheus import PrometheusMetricReader

            metric_reader = PrometheusMetricReader()
        histogram_view = View(
            instrument_name="*duration*", aggregation=ExplicitBucketHistogramAggregation(DURATION_BUCKETS_S)
        )
        self._meter_provider = MeterProvider(
            resource=resource, metric_readers=[metric_reader], views=[histogram_view]
        )
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

    def serve_metrics(self, host: str | None = None) -> int | None:
        """Starts the /metrics HTTP endpoint (Prometheus text) if a port is configured; returns the port."""
        if self.metrics_port is None:
            return None
        from prometheus_client import start_http_server

        start_http_server(self.metrics_port, addr=host or self.metrics_host)
        return self.metrics_port

    # -- tracing helpers ----------------------------------------------------------------------------

    def extract(self, metadata: Sequence[Any] | None) -> Context | None:
        carrier = {m.key: m.value for m in metadata or () if m.key in TRACE_HEADERS}
        return _PROPAGATOR.extract(carrier) if carrier else None

    def start_server_span(self, name: str, metadata: Sequence[Any] | None) -> Any:
        assert self.tracer is not None
        return self.tracer.start_as_current_span(name, context=self.extract(metadata), kind=SpanKind.SERVER)

    @staticmethod
    def inject() -> list[tuple[str, str]]:
        """The current span's trace context as gRPC metadata for the next hop."""
        carrier: dict[str, str] = {}
        _PROPAGATOR.inject(carrier)
        return list(carrier.items())

    def shutdown(self) -> None:
        if self.tracing:
            self._tracer_provider.shutdown()
        if self.metrics:
            self._meter_provider.shutdown()
