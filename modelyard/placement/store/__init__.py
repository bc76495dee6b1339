"""One key-value store interface with two implementations: embedded (SQLite file) and etcd."""

from __future__ import annotations

import os
from pathlib import Path

from modelyard.placement.store.base import (
    CompactedError,
    Event,
    KeyValue,
    Lease,
    Store,
    StoreError,
    StoreUnavailable,
)

DEFAULT_STORE_ENV = "MODELYARD_STORE"
DEFAULT_STORE_DIR = ".modelyard/store"

__all__ = [
    "DEFAULT_STORE_ENV",
    "CompactedError",
    "Event",
    "KeyValue",
    "Lease",
    "Store",
    "StoreError",
    "StoreUnavailable",
    "default_store_url",
    "missing_store",
    "open_store",
]


def default_store_url() -> str:
    """The store named by $MODELYARD_STORE, else the embedded store in ./.modelyard/store."""
    return os.environ.get(DEFAULT_STORE_ENV) or DEFAULT_STORE_DIR


def open_store(url: str) -> Store:
    """`etcd://host:port[,host:port...]` opens etcd; anything else is a directory for the embedded store."""
    if url.startswith("etcd://"):
        from modelyard.placement.store.etcd import EtcdStore

        return EtcdStore.from_url(url)
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
