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
COLD_CALL_WAIT = "modelyard_cold_call_wait_seconds"  # histogram: what a call waited for a copy (no labels)
CACHE_HITS = "modelyard_cache_hits_total"  # calls that found a ready copy
CACHE_MISSES = "modelyard_cache_misses_total"  # calls that had to wait for a copy (a cold call)
# fleet, as the leading placement controller sees it in the store (the other controllers export none)
COPIES = "modelyard_copies"  # gauge; labels: state (loading|ready|failed|unloading|lost)
UNPLACED_MODELS = "modelyard_unplaced_models"  # gauge: registered models with fewer live copies than replicas
CONTAINER_MEMORY = "modelyard_container_memory_bytes"  # gauge; labels: container, kind (used|capacity)
# the store, as every placement controller reads it (etcd: every 30 s; alert rules take the max)
STORE_DB_BYTES = "modelyard_store_db_bytes"  # gauge: etcd's database size (dbSize of the member it asks)
STORE_QUOTA_BYTES = "modelyard_store_quota_bytes"  # gauge: its space quota (MODELYARD_ETCD_QUOTA_BYTES)
STORE_FULL = "modelyard_store_full"  # gauge: 1 while etcd's NOSPACE alarm refuses writes
# placement controller
CONTROLLER_LEADER = "modelyard_controller_leader"  # gauge: 1 on the leading controller, 0 on the others
PLACEMENT_FAILURES = "modelyard_placement_failures_total"  # models a pass could not place, copies not ready
RECONCILE = "modelyard_reconcile_seconds"  # histogram; labels: pass (incremental|full)
# agents and our container
AGENT_REGISTERED = "modelyard_agent_registered"  # gauge; labels: container (1 while registered in the store)
AGENT_LOADS = "modelyard_agent_loads_total"  # labels: container, outcome (ready|failed)
AGENT_LOAD_DURATION = "modelyard_agent_load_duration_seconds"  # histogram; labels: container
MODEL_LOAD = "modelyard_model_load_seconds"  # histogram; labels: backend (successful loads)
EVICTIONS = "modelyard_evictions_total"  # copies an agent unloaded after they were ready; labels: backend
EVICTION_AGE = "modelyard_eviction_age_seconds"  # histogram: how long an evicted copy had been loaded

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
    COLD_CALL_WAIT,
    CACHE_HITS,
    CACHE_MISSES,
    COPIES,
    UNPLACED_MODELS,
    CONTAINER_MEMORY,
    STORE_DB_BYTES,
    STORE_QUOTA_BYTES,
    STORE_FULL,
    CONTROLLER_LEADER,
    PLACEMENT_FAILURES,
    RECONCILE,
    AGENT_REGISTERED,
    AGENT_LOADS,
    AGENT_LOAD_DURATION,
    MODEL_LOAD,
    EVICTIONS,
    EVICTION_AGE,
)
