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

from modelyard.placement.follow import StoreFollower
from modelyard.placement.registry import Changes, Fleet

STORE_SERVICE = "modelyard.store"
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


class RouterHealth:
    """Sets the health statuses when the follower's state changes: it waits for the follower's events (a
    published change, a health flip), never polls, so an idle router spends no CPU here."""

    def __init__(self, follower: StoreFollower, services: tuple[str, ...]) -> None:
        self.servicer = health.aio.HealthServicer()
        self.follower = follower
        self.services = ("", *services)
        self._changed = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        follower.listen(self._on_publish)  # the first load, and every reload after the store came back
        # The follower flips `healthy` without publishing (a watch that fails, a probe unanswered): be told.
        follower.on_health(lambda _healthy: self._changed.set())

    def _on_publish(self, fleet: Fleet, changes: Changes) -> None:
        self._changed.set()

    async def start(self) -> None:
        for service in (*self.services, STORE_SERVICE):
            await self.servicer.set(service, NOT_SERVING)
        self._task = asyncio.create_task(self._track())

    async def stop(self) -> None:
        self.follower.unlisten(self._on_publish)
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        await self.servicer.enter_graceful_shutdown()

    async def _track(self) -> None:
        last: tuple[bool, bool] | None = None
        while True:
            self._changed.clear()
            state = (self.follower.first_load.is_set(), not self.follower.degraded)
            if state != last:
                loaded, store_ok = state
                for service in self.services:
                    await self.servicer.set(service, SERVING if loaded else NOT_SERVING)
                await self.servicer.set(STORE_SERVICE, SERVING if loaded and store_ok else NOT_SERVING)
                last = state
            await self._changed.wait()
