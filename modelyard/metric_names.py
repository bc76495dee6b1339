"""Names of the Prometheus metrics modelyard exports (on /metrics), shared by code, alert rules and tests.

Counters end in `_total`, durations are histograms in seconds (Prometheus adds `_bucket`, `_sum`, `_count`).
"""

from __future__ import annotations

# router
REQUESTS = "modelyard_router_requests_total"  # labels: method, model, tenant, code
REQUEST_DURATION = "modelyard_router_request_duration_seconds"  # histogram; labels: method, model
IN_FLIGHT = "modelyard_router_in_flight_requests"  # gauge; labels: method
STREAMS_OPEN = "modelyard_router_streams_open"  # gauge
RETRIES = "modelyard_router_retries_total"  # labels: model
REFUSED = "modelyard_router_refused_total"  # labels: tenant, limit (inflight|rps|queue|deadline)
QUEUE_WAIT = "modelyard_router_queue_wait_seconds"  # histogram; labels: tenant
QUEUE_DEPTH = "modelyard_router_queue_depth"  # gauge; labels: container
LAZY_LOADS = "modelyard_router_lazy_loads_total"  # labels: model, outcome (ready|failed|timeout)
LAZY_LOAD_DURATION = "modelyard_router_lazy_load_duration_seconds"  # histogram
PIPELINE_STEP_DURATION = "modelyard_router_pipeline_step_duration_seconds"  # histogram: pipeline, step
SHARD_MAP_GENERATION = "modelyard_shard_map_generation"  # gauge
WATCH_LAG = "modelyard_watch_lag_seconds"  # gauge: age of the newest store event applied
STORE_REACHABLE = "modelyard_store_reachable"  # gauge: 1 or 0
# fleet, as the router sees it in the store
COPIES = "modelyard_copies"  # gauge; labels: state (loading|ready|failed|unloading|lost)
UNPLACED_MODELS = "modelyard_unplaced_models"  # gauge: registered models with fewer live copies than replicas
CONTAINER_MEMORY_USED = "modelyard_container_memory_used_bytes"  # gauge; labels: container
CONTAINER_MEMORY_CAPACITY = "modelyard_container_memory_capacity_bytes"  # gauge; labels: container
# agents and our container
AGENT_LOADS = "modelyard_agent_loads_total"  # labels: container, outcome (ready|failed)
AGENT_LOAD_DURATION = "modelyard_agent_load_duration_seconds"  # histogram; labels: container

ALL = (
    REQUESTS,
    REQUEST_DURATION,
    IN_FLIGHT,
    STREAMS_OPEN,
    RETRIES,
    REFUSED,
    QUEUE_WAIT,
    QUEUE_DEPTH,
    LAZY_LOADS,
    LAZY_LOAD_DURATION,
    PIPELINE_STEP_DURATION,
    SHARD_MAP_GENERATION,
    WATCH_LAG,
    STORE_REACHABLE,
    COPIES,
    UNPLACED_MODELS,
    CONTAINER_MEMORY_USED,
    CONTAINER_MEMORY_CAPACITY,
    AGENT_LOADS,
    AGENT_LOAD_DURATION,
)
