"""Structured logs: one JSON object per line, carrying the trace and span ids of the current span."""

from __future__ import annotations

import json
import logging

from opentelemetry.sdk.trace import TracerProvider

from modelyard.logs import JsonFormatter


def record(message: str) -> logging.LogRecord:
    return logging.LogRecord("modelyard.test", logging.WARNING, __file__, 1, message, None, None)


def test_json_lines_carry_the_current_trace_and_span() -> None:
    tracer = TracerProvider().get_tracer("test")
    with tracer.start_as_current_span("call") as span:
        line = JsonFormatter().format(record("copy of m@1 failed"))
    entry = json.loads(line)
    context = span.get_span_context()
    assert entry["trace_id"] == f"{context.trace_id:032x}" and entry["span_id"] == f"{context.span_id:016x}"
    assert entry["level"] == "WARNING" and entry["logger"] == "modelyard.test"
    assert entry["message"] == "copy of m@1 failed"


def test_outside_a_span_there_are_no_trace_fields() -> None:
    entry = json.loads(JsonFormatter().format(record("idle")))
    assert "trace_id" not in entry and entry["message"] == "idle"
