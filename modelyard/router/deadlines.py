"""The router's default deadline for upstream unary calls whose caller set none.

A caller's own deadline travels on with its call (gRPC's deadline). A call without one is still held to
the router's default (60 s unless `--default-deadline-s`), so a container that stops answering cannot hold
a caller, its tenant's in-flight slot and its container's slot for ever. That default is kept here by one
sweep instead of a gRPC deadline per call: a deadline arms and cancels a timer in gRPC's core on every
call, which cost 4-5 % of a small call's router CPU and about 50 us of its latency (measured with
benchmarks/test_router_hop.py's harness), while the sweep costs a dict write per call and runs only while
such calls are in flight. A call is cancelled at most one sweep period (a tenth of the default, at most
1 s) after its default deadline, and its caller gets DEADLINE_EXCEEDED.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from modelyard.placement.model import ModelVersion
from modelyard.router.errors import DeadlineExceeded

MAX_SWEEP_PERIOD_S = 1.0


class DefaultDeadline:
    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.period_s = min(MAX_SWEEP_PERIOD_S, seconds / 10)
        self._held: dict[Any, float] = {}  # upstream call -> its monotonic deadline; the sweep takes it out
        self._sweeper: asyncio.Task[None] | None = None

    async def call(
        self, unary: Any, request: bytes, metadata: Any, deadline: float, model: ModelVersion
    ) -> bytes:
        """`unary(request)` for `model`, held to `deadline` (monotonic); raises DeadlineExceeded when the
        sweep cancelled it."""
        call = unary(request, metadata=metadata)
        self._held[call] = deadline
        if self._sweeper is None:
            self._sweeper = asyncio.get_running_loop().create_task(self._sweep(), name="default-deadline")
        try:
            response: bytes = await call
            return response
        except asyncio.CancelledError:
            task = asyncio.current_task()
            # Not held any more: the sweep cancelled it (a caller's own cancellation leaves it held).
            if call not in self._held and (task is None or not task.cancelling()):
                raise DeadlineExceeded(
                    f"model '{model.name}' version '{model.version}': no answer within the router's default "
                    f"deadline of {self.seconds:g} s (the call set no deadline of its own)"
                ) from None
            raise
        finally:
            self._held.pop(call, None)

    async def _sweep(self) -> None:
        try:
            while self._held:
                await asyncio.sleep(self.period_s)
                now = time.monotonic()
                late = [call for call, deadline in self._held.items() if deadline <= now]
                for call in late:
                    del self._held[call]
                    call.cancel()
        finally:
            self._sweeper = None

    async def close(self) -> None:
        sweeper, self._sweeper = self._sweeper, None
        if sweeper is not None:
            sweeper.cancel()
            await asyncio.gather(sweeper, return_exceptions=True)
