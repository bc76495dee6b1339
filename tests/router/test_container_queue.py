"""Calls waiting for a container at its bound, on an event loop but without servers."""

from __future__ import annotations

import asyncio

import pytest

from modelyard.placement import registry
from modelyard.placement.model import Container
from modelyard.placement.registry import Changes, Fleet
from modelyard.placement.store.base import Event
from modelyard.router.admission import Overloaded
from modelyard.router.container_queue import MAX_QUEUED_PER_TENANT, ContainerQueues


def queues_for(bound: int, routers: int = 1) -> tuple[ContainerQueues, dict[str, int]]:
    outstanding: dict[str, int] = {}
    queues = ContainerQueues(outstanding)
    fleet = Fleet()
    container = Container("c", "a:1", max_inflight=bound)
    fleet.apply(Event("put", registry.CONTAINERS + "c", container.to_json(), 1))
    for r in range(routers):
        fleet.apply(Event("put", registry.ROUTERS + f"r{r}", b"1", 2 + r))
    queues.on_change(fleet, Changes(everything=True))
    return queues, outstanding


def test_bounds_come_from_the_registration_or_the_backends_default_shared_among_routers() -> None:
    queues, _ = queues_for(5, routers=2)
    assert queues.bounds == {"c": 3}
    assert Container("t", "a:1").inflight_bound == 16
    assert Container("s", "a:1", backend="sagemaker").inflight_bound == 4


def test_a_freed_slot_goes_to_waiting_tenants_in_turn() -> None:
    async def scenario() -> list[str]:
        queues, outstanding = queues_for(1)
        outstanding["c"] = 1  # one call running
        order: list[str] = []

        async def call(tenant: str) -> None:
            await queues.wait_turn("c", tenant, 2, 10.0)
            order.append(tenant)
            outstanding["c"] -= 1
            queues.release("c")

        tasks = [asyncio.create_task(call("noisy")) for _ in range(6)]
        await asyncio.sleep(0)
        tasks += [asyncio.create_task(call("quiet")) for _ in range(2)]
        await asyncio.sleep(0)
        assert queues.depth() == {"c": 8}
        outstanding["c"] -= 1  # the running call ends
        queues.release("c")
        await asyncio.gather(*tasks)
        assert outstanding["c"] == 0 and queues.depth() == {}
        return order

    order = asyncio.run(scenario())
    # noisy came first with 6 callers, quiet with 2: quiet's are served within noisy's next turn each.
    assert order.index("quiet") <= 2 and order[:6].count("quiet") == 2


def test_a_full_queue_is_refused_at_once() -> None:
    async def scenario() -> None:
        queues, outstanding = queues_for(1)
        outstanding["c"] = 1
        waiters = [
            asyncio.create_task(queues.wait_turn("c", "noisy", 2, 10.0)) for _ in range(MAX_QUEUED_PER_TENANT)
        ]
        await asyncio.sleep(0)
        with pytest.raises(Overloaded, match="queue for it is full") as refused:
            await queues.wait_turn("c", "noisy", 2, 10.0)
        assert refused.value.limit == "queue"
        for waiter in waiters:
            waiter.cancel()
        await asyncio.gather(*waiters, return_exceptions=True)
        assert queues.depth() == {} and outstanding["c"] == 1

    asyncio.run(scenario())


def test_a_call_whose_deadline_cannot_be_met_is_refused_at_once_not_queued() -> None:
    async def scenario() -> None:
        queues, outstanding = queues_for(2)
        queues.interval_s["c"] = 0.05  # calls end every 50 ms: a call runs ~100 ms on a slot
        outstanding["c"] = 2
        loop = asyncio.get_running_loop()
        started = loop.time()
        with pytest.raises(Overloaded, match="deadline") as refused:
            await queues.wait_turn("c", "quiet", 2, 0.08)
        assert loop.time() - started < 0.02 and refused.value.limit == "deadline"
        assert queues.depth() == {}

    asyncio.run(scenario())


def test_a_waiter_leaves_before_its_deadline_comes_too_close() -> None:
    async def scenario() -> None:
        queues, outstanding = queues_for(1)
        outstanding["c"] = 1  # never ends
        with pytest.raises(Overloaded, match="came too close"):
            await queues.wait_turn("c", "quiet", 2, 0.05)
        assert queues.depth() == {} and outstanding["c"] == 1

    asyncio.run(scenario())


def test_a_cancelled_waiter_gives_its_handed_slot_to_the_next() -> None:
    async def scenario() -> None:
        queues, outstanding = queues_for(1)
        outstanding["c"] = 1
        first = asyncio.create_task(queues.wait_turn("c", "a", 2, 10.0))
        second = asyncio.create_task(queues.wait_turn("c", "b", 2, 10.0))
        await asyncio.sleep(0)
        outstanding["c"] -= 1
        queues.release("c")  # handed to `first`, which is cancelled before it runs
        first.cancel()
        await asyncio.gather(first, return_exceptions=True)
        await asyncio.wait_for(second, 1.0)
        assert outstanding["c"] == 1

    asyncio.run(scenario())
