"""Opening the model store a location names: a local directory, `file://` or `s3://BUCKET/PREFIX`."""

from __future__ import annotations

from modelyard.catalog.modelstore import ArchiveError, LocalModelStore, ModelStore, file_path


def open_model_store(uri: str) -> ModelStore:
    path = file_path(uri)
    if path is not None:
        return LocalModelStore(path)
    if uri.startswith("s3://"):
        from modelyard.catalog.s3store import (
            S3ModelStore,  # boto3 costs ~0.3 s to import: only for S3 stores
        )

        return S3ModelStore(uri)
    raise ArchiveError(f"unsupported model store {uri!r}: a local directory, file:// or s3://BUCKET/PREFIX")
