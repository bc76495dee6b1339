"""gRPC health checking for the router: live while it can route, degraded while the store is away.

Service names:
- "" (overall) and "inference.GRPCInferenceService" / "modelyard.v1.Router": SERVING once the routing table
  is loaded, and still SERVING when the store becomes unreachable (the last table keeps serving);
- "modelyard.store": SERVING while the store is reachable, NOT_SERVING while the router is degraded.
"""

from __future__ import annotations

import asyncio
import contextlib

from grpc_health.v1 import health, health_pb2

from router.follow import TableFollower

STORE_SERVICE = "modelyard.store"
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


class RouterHealth:
    def __init__(
        self, follower: TableFollower, services: tuple[str, ...], *, interval_s: float = 0.2
    ) -> None:
        self.servicer = health.aio.HealthServicer()
        self.follower = follower
        self.services = ("", *services)
        self.interval_s = interval_s
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        for service in (*self.services, STORE_SERVICE):
            await self.servicer.set(service, NOT_SERVING)
        self._task = asyncio.create_task(self._track())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        await self.servicer.enter_graceful_shutdown()

    async def _track(self) -> None:
        last: tuple[bool, bool] | None = None
        while True:
            state = (self.follower.first_load.is_set(), not self.follower.degraded)
            if state != last:
                loaded, store_ok = state
                for service in self.services:
                    await self.servicer.set(service, SERVING if loaded else NOT_SERVING)
                await self.servicer.set(STORE_SERVICE, SERVING if loaded and store_ok else NOT_SERVING)
                last = state
            await asyncio.sleep(self.interval_s)
