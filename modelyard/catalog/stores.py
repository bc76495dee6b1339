"""Opening the model store a location names: a local directory, `file://` or `s3://BUCKET/PREFIX`."""

from __future__ import annotations

from pathlib import Path

from modelyard.catalog.modelstore import ArchiveError, LocalModelStore, ModelStore, file_path


def open_model_store(uri: str, *, cache_dir: Path | None = None) -> ModelStore:
    """`cache_dir`: where an S3 store keeps local copies of the artifacts it reads (its default if None)."""
    path = file_path(uri)
    if path is not None:
        return LocalModelStore(path)
    if uri.startswith("s3://"):
        from modelyard.catalog.s3store import (
            S3ModelStore,  # boto3 costs ~0.3 s to import: only for S3 stores
        )

        return S3ModelStore(uri) if cache_dir is None else S3ModelStore(uri, cache_dir=cache_dir)
    raise ArchiveError(f"unsupported model store {uri!r}: a local directory, file:// or s3://BUCKET/PREFIX")
