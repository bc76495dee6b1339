"""A local fleet (Triton containers, agents, router) run on its own event loop thread, for sync tests."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Awaitable, Callable, Coroutine
from pathlib import Path
from typing import Any, TypeVar

from modelyard.local import LocalFleet

T = TypeVar("T")


class FleetThread:
    """Runs `setup(fleet)` on a background loop; `call()` runs more coroutines there; `stop()` tears down."""

    def __init__(self, workdir: Path, store_url: str, containers: int = 2) -> None:
        self.fleet = LocalFleet(workdir=workdir, store_url=store_url, containers=containers, port=0)
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="fleet", daemon=True)
        self._thread.start()

    def call(self, coro: Coroutine[Any, Any, T], timeout_s: float = 180.0) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout_s)

    def start(self, setup: Callable[[LocalFleet], Awaitable[T]]) -> T:
        async def run() -> T:
            return await setup(self.fleet)

        return self.call(run())

    @property
    def address(self) -> str:
        assert self.fleet.router is not None
        return self.fleet.router.address

    def stop(self) -> None:
        try:
            self.call(self.fleet.stop(), timeout_s=60)
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(10)
            self.loop.close()
