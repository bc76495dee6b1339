"""The container adapter that hands a container local, verified copies of S3 artifacts (from the agent's
artifact cache, catalog/s3store.py), so every backend loads from S3 without knowing of it."""

from __future__ import annotations

import asyncio
import dataclasses

from modelyard.catalog.s3store import ArtifactCache, S3StoreError, is_s3_uri
from modelyard.containers.adapter import ContainerAdapter, LoadError
from modelyard.placement.model import ModelVersion


class FetchingAdapter:
    """A container adapter that hands the container a local, verified copy of an S3 artifact.

    The agent keeps the registered model (its `s3://` URI); only the container sees `file://` paths into
    the cache, so Triton, our container and MLServer load from S3 without knowing of it.
    """

    def __init__(self, inner: ContainerAdapter, cache: ArtifactCache) -> None:
        self.inner = inner
        self.cache = cache

    async def local(self, model: ModelVersion) -> ModelVersion:
        if not is_s3_uri(model.artifact_uri):
            return model
        try:
            path = await asyncio.to_thread(self.cache.fetch, model.artifact_uri)
        except S3StoreError as exc:
            raise LoadError(f"{model.key}: {exc}") from exc
        return dataclasses.replace(model, artifact_uri=path.resolve().as_uri())

    async def live(self) -> bool:
        return await self.inner.live()

    async def load(self, model: ModelVersion) -> None:
        await self.inner.load(await self.local(model))

    async def unload(self, model: ModelVersion) -> None:
        await self.inner.unload(model)

    async def footprint(self, model: ModelVersion) -> int:
        return await self.inner.footprint(model)

    async def ready_versions(self) -> set[str]:
        return await self.inner.ready_versions()

    async def close(self) -> None:
        await self.inner.close()
