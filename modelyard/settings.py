"""Every `MODELYARD_*` environment variable, with its default and meaning: the one place they are read.

The command line (and `up`) reads them here, or through click options naming them, and passes the values
down as arguments; no module below the applications reads the environment for them
(tests/test_settings.py checks). Kept light (no imports beyond the standard library): every command
imports it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from modelyard.placement.store import EtcdAccess, Store


@dataclass(frozen=True)
class Setting:
    name: str
    default: str | None  # None: unset unless given
    meaning: str


SETTINGS = (
    Setting("MODELYARD_STORE", ".modelyard/store", "the store: etcd://host:port[,...] or a directory"),
    Setting("MODELYARD_ETCD_USER", None, "etcd user (also etcd://user:password@...)"),
    Setting("MODELYARD_ETCD_PASSWORD", None, "etcd password"),
    Setting("MODELYARD_ETCD_CA", None, "CA (PEM) that signed etcd's certificate: TLS to etcd"),
    Setting("MODELYARD_ETCD_CERT", None, "client certificate (PEM) for etcd's mutual TLS"),
    Setting("MODELYARD_ETCD_KEY", None, "its key"),
    Setting("MODELYARD_ETCD_QUOTA_BYTES", str(2 * 1024**3), "etcd's --quota-backend-bytes, for the alert"),
    Setting("MODELYARD_MODEL_STORE", ".modelyard/artifacts", "the artifact store: a folder or s3://BUCKET/PREFIX"),
    Setting("MODELYARD_MAX_ARCHIVE_BYTES", str(2 * 1024**3), "archives larger than this are refused"),
    Setting("MODELYARD_ARTIFACT_CACHE", ".modelyard/artifact-cache", "verified local copies of S3 artifacts"),
    Setting("MODELYARD_LOG_LEVEL", "WARNING", "Python log level"),
    Setting("MODELYARD_LOG_JSON", None, "one JSON object per log line when set"),
    Setting("MODELYARD_EVENT_LOOP", "uvloop", "the router's event loop: uvloop or asyncio"),
    Setting("MODELYARD_TRACES", "none", "trace exporter: none, console or otlp"),
    Setting("MODELYARD_METRICS_PORT", None, "serve /metrics on this port (off when unset)"),
    Setting("MODELYARD_METRICS_HOST", "127.0.0.1", "the address /metrics listens on"),
    Setting("MODELYARD_TLS_CERT", None, "server certificate (PEM) of the router or our container"),
    Setting("MODELYARD_TLS_KEY", None, "its key"),
    Setting("MODELYARD_TLS_CLIENT_CA", None, "CA whose client certificates the server requires (mutual TLS)"),
    Setting("MODELYARD_UPSTREAM_CA", None, "CA of the containers' certificates: the router's TLS to them"),
    Setting("MODELYARD_UPSTREAM_CERT", None, "the router's client certificate for containers"),
    Setting("MODELYARD_UPSTREAM_KEY", None, "its key"),
    Setting("MODELYARD_TENANT_TOKENS", None, "file of bearer tokens -> tenants"),
    Setting("MODELYARD_TENANT_CERTS", None, "file of client certificate subjects -> tenants"),
    Setting("MODELYARD_INSECURE_TRUST_TENANT_HEADER", None, "trust x-tenant-id as sent (trusted gateways)"),
    Setting("MODELYARD_FLEET_SECRET_FILE", None, "file holding the fleet secret containers require"),
    Setting("MODELYARD_MAX_MESSAGE_BYTES", str(64 * 1024**2), "largest gRPC request or response"),
    Setting("MODELYARD_RATE_PERIOD_S", "5.0", "seconds between a router's reports of its call rates"),
    Setting("MODELYARD_HTTP_PORT", None, "the router's KServe v2 REST port (serve; off when unset)"),
    Setting("MODELYARD_ROUTER", "127.0.0.1:8001", "the router `modelyard infer` calls"),
    Setting("MODELYARD_TOKEN", None, "bearer token `modelyard infer` presents"),
    Setting("MODELYARD_ADMISSION", "on", "off: no tenant limits nor container bounds (to measure them)"),
)  # fmt: skip
BY_NAME = {setting.name: setting for setting in SETTINGS}


def get(name: str) -> str | None:
    """The variable's value when set (and not empty), else its default."""
    return os.environ.get(name) or BY_NAME[name].default


def etcd_quota_bytes() -> int:
    """etcd's space quota as the controller reports it next to the database size (etcd does not say it)."""
    return int(get("MODELYARD_ETCD_QUOTA_BYTES") or 0)


def store_url(given: str | None = None) -> str:
    """`--store` when given, else $MODELYARD_STORE, else the embedded store in ./.modelyard/store."""
    return given or get("MODELYARD_STORE") or ".modelyard/store"


def etcd_access() -> EtcdAccess:
    from modelyard.placement.store import EtcdAccess

    return EtcdAccess(
        username=get("MODELYARD_ETCD_USER"),
        password=get("MODELYARD_ETCD_PASSWORD"),
        ca=get("MODELYARD_ETCD_CA"),
        cert=get("MODELYARD_ETCD_CERT"),
        key=get("MODELYARD_ETCD_KEY"),
    )


def open_configured_store(given: str | None = None) -> Store:
    """The store `--store` (else $MODELYARD_STORE) names, with the etcd credentials configured here."""
    from modelyard.placement.store import open_store

    return open_store(store_url(given), etcd_access())


def model_store(given: str | None = None) -> str:
    return given or get("MODELYARD_MODEL_STORE") or ".modelyard/artifacts"


def artifact_cache_dir() -> Path:
    return Path(get("MODELYARD_ARTIFACT_CACHE") or ".modelyard/artifact-cache")


def admission() -> bool:
    return (get("MODELYARD_ADMISSION") or "on").lower() != "off"


def rate_period_s() -> float:
    return float(get("MODELYARD_RATE_PERIOD_S") or 5.0)


def traces(given: str | None = None) -> str:
    """MODELYARD_TRACES, else OpenTelemetry's standard OTEL_TRACES_EXPORTER, else none."""
    return given or get("MODELYARD_TRACES") or os.environ.get("OTEL_TRACES_EXPORTER") or "none"


def metrics_port(given: int | None = None) -> int | None:
    if given is not None:
        return given
    value = get("MODELYARD_METRICS_PORT")
    return int(value) if value else None


def metrics_host() -> str:
    return get("MODELYARD_METRICS_HOST") or "127.0.0.1"
