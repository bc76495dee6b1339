"""The adapter for our own container (numpy_container/container.py): load, unload and measure over KServe v2.

tritonclient's `load_model` cannot pass our load parameters (`version`, `artifact_uri`), so this talks to
the container with the generated KServe stubs directly.
"""

from __future__ import annotations

import grpc
import grpc.aio
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc as pb_grpc

from modelyard.containers.adapter import LoadError
from modelyard.fleet_secret import FLEET_SECRET_HEADER
from modelyard.numpy_container import MEMORY_BYTES_TRAILER
from modelyard.placement.model import ModelVersion, model_key


class CustomAdapter:
    def __init__(
        self,
        address: str,
        credentials: grpc.ChannelCredentials | None = None,
        *,
        fleet_secret: str | None = None,
    ) -> None:
        self.address = address
        # Sent on every call: a container with a fleet secret refuses calls without it.
        self._metadata = ((FLEET_SECRET_HEADER, fleet_secret),) if fleet_secret else None
        self._loaded_bytes: dict[str, int] = {}  # key -> bytes its load answered, until measured
        if credentials is not None:
            self._channel = grpc.aio.secure_channel(address, credentials)
        else:
            self._channel = grpc.aio.insecure_channel(address)
        self._stub = pb_grpc.GRPCInferenceServiceStub(self._channel)

    async def close(self) -> None:
        await self._channel.close()

    async def live(self) -> bool:
        try:
            response = await self._stub.ServerLive(pb.ServerLiveRequest(), timeout=2, metadata=self._metadata)
        except grpc.aio.AioRpcError:
            return False
        return bool(response.live)

    async def load(self, model: ModelVersion, timeout_s: float = 120.0) -> None:
        request = pb.RepositoryModelLoadRequest(model_name=model.name)
        request.parameters["version"].string_param = model.version
        request.parameters["artifact_uri"].string_param = model.artifact_uri
        call = self._stub.RepositoryModelLoad(request, timeout=timeout_s, metadata=self._metadata)
        try:
            await call
            trailers = await call.trailing_metadata()
        except grpc.aio.AioRpcError as exc:
            raise LoadError(f"{model.key}: {exc.code().name}: {exc.details()}") from exc
        for key, value in trailers or ():
            if key == MEMORY_BYTES_TRAILER and str(value).isdigit():
                self._loaded_bytes[model.key] = int(value)

    async def unload(self, model: ModelVersion, timeout_s: float = 60.0) -> None:
        request = pb.RepositoryModelUnloadRequest(model_name=model.name)
        request.parameters["version"].string_param = model.version
        try:
            await self._stub.RepositoryModelUnload(request, timeout=timeout_s, metadata=self._metadata)
        except grpc.aio.AioRpcError as exc:
            raise LoadError(f"{model.key}: unload failed: {exc.code().name}: {exc.details()}") from exc

    async def footprint(self, model: ModelVersion) -> int:
        """The bytes the container accounts for this version (its `memory_usage` statistic): as its last
        load answered them (one call less per load), else asked."""
        loaded = self._loaded_bytes.pop(model.key, None)
        if loaded is not None:
            return loaded
        request = pb.ModelStatisticsRequest(name=model.name, version=model.version)
        response = await self._stub.ModelStatistics(request, timeout=5, metadata=self._metadata)
        return sum(u.byte_size for s in response.model_stats for u in s.memory_usage)

    async def ready_versions(self) -> set[str]:
        """Keys (`name@version`) of the versions the container holds ready (its repository index)."""
        response = await self._stub.RepositoryIndex(
            pb.RepositoryIndexRequest(ready=True), timeout=10, metadata=self._metadata
        )
        return {model_key(m.name, m.version) for m in response.models if m.state == "READY" and m.version}
