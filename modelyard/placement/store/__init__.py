"""One key-value store interface with two implementations: embedded (SQLite file) and etcd."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from modelyard.placement.store.base import (
    CompactedError,
    Event,
    KeyValue,
    Lease,
    Store,
    StoreError,
    StoreFull,
    StoreSpace,
    StoreUnavailable,
    stop_leased,
)

DEFAULT_STORE_DIR = ".modelyard/store"

__all__ = [
    "CompactedError",
    "EtcdAccess",
    "Event",
    "KeyValue",
    "Lease",
    "Store",
    "StoreError",
    "StoreFull",
    "StoreSpace",
    "StoreUnavailable",
    "missing_store",
    "open_store",
    "stop_leased",
]


@dataclass(frozen=True)
class EtcdAccess:
    """How to reach etcd beyond its URL: RBAC user and password, TLS files (PEM paths); None: not used."""

    username: str | None = None
    password: str | None = None
    ca: str | None = None
    cert: str | None = None
    key: str | None = None


def open_store(url: str, etcd: EtcdAccess | None = None) -> Store:
    """`etcd://host:port[,host:port...]` opens etcd (with `etcd`'s credentials); anything else is a
    directory for the embedded store."""
    if url.startswith("etcd://"):
        from modelyard.placement.store.etcd import EtcdStore

        return EtcdStore.from_url(url, etcd or EtcdAccess())
    if "://" in url and not url.startswith("file://"):
        raise StoreError(f"unsupported store URL {url!r}: use etcd://host:port or a directory")
    from modelyard.placement.store.embedded import EmbeddedStore

    return EmbeddedStore(Path(url.removeprefix("file://")))


def missing_store(url: str) -> Path | None:
    """The embedded store's directory when `url` names one that holds no store yet (opening it would create
    one), else None (an existing store, or etcd)."""
    if url.startswith("etcd://") or ("://" in url and not url.startswith("file://")):
        return None
    directory = Path(url.removeprefix("file://"))
    from modelyard.placement.store.embedded import STORE_FILE

    return None if (directory / STORE_FILE).is_file() else directory
