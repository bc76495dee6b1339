"""The router's default deadline for upstream calls whose caller set none (router/deadlines.py).

The upstream calls here are asyncio futures: what the sweep needs of a gRPC call is that it can be
awaited and cancelled, and a call that never answers is the case under test (a real silent container:
tests/test_stream_safety.py, Triton under SIGSTOP).
"""

from __future__ import annotations

import asyncio
import time

import pytest

from modelyard.placement.model import ModelVersion
from modelyard.router.deadlines import DefaultDeadline
from modelyard.router.errors import DeadlineExceeded

MODEL = ModelVersion("scale", "2", backend="triton", memory_bytes=1)


def never_answers() -> tuple[list[asyncio.Future[bytes]], object]:
    calls: list[asyncio.Future[bytes]] = []

    def unary(request: bytes, *, metadata: object) -> asyncio.Future[bytes]:
        calls.append(asyncio.get_running_loop().create_future())
        return calls[-1]

    return calls, unary


def test_a_call_past_the_default_deadline_is_cancelled_and_deadline_exceeded() -> None:
    async def run() -> None:
        deadlines = DefaultDeadline(0.2)
        calls, unary = never_answers()
        started = time.monotonic()
        held = asyncio.create_task(deadlines.call(unary, b"", (), started + 0.2, MODEL))
        await asyncio.sleep(0)  # one loop step: the task runs up to its upstream call, held
        sweeper = deadlines._sweeper
        assert sweeper is not None
        with pytest.raises(DeadlineExceeded, match=r"'scale' version '2'.*default deadline of 0.2 s"):
            await held
        assert 0.2 <= time.monotonic() - started < 0.2 + 2 * deadlines.period_s + 0.1
        assert calls[0].cancelled()  # the upstream call itself is cancelled, not left running
        await asyncio.wait_for(sweeper, 5)  # nothing held: the sweep ends (an idle router stays idle)
        assert deadlines._sweeper is None

    asyncio.run(run())


def test_an_answer_within_the_deadline_is_returned_and_nothing_stays_held() -> None:
    async def run() -> None:
        deadlines = DefaultDeadline(5.0)

        def unary(request: bytes, *, metadata: object) -> asyncio.Future[bytes]:
            answer = asyncio.get_running_loop().create_future()
            answer.set_result(request + b"!")
            return answer

        assert await deadlines.call(unary, b"ok", (), time.monotonic() + 5, MODEL) == b"ok!"
        assert not deadlines._held
        await deadlines.close()
        assert deadlines._sweeper is None

    asyncio.run(run())


def test_a_caller_cancelled_before_the_deadline_is_cancelled_not_deadline_exceeded() -> None:
    async def run() -> None:
        deadlines = DefaultDeadline(5.0)
        calls, unary = never_answers()
        task = asyncio.create_task(deadlines.call(unary, b"", (), time.monotonic() + 5, MODEL))
        await asyncio.sleep(0)  # one loop step: the task runs up to its upstream call, held
        assert calls and deadlines._held
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert calls[0].cancelled() and not deadlines._held
        await deadlines.close()

    asyncio.run(run())
