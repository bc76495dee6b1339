"""A local fleet (Triton containers, agents, router) run on its own event loop thread, for sync tests."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Awaitable, Callable, Coroutine
from pathlib import Path
from typing import Any, TypeVar

from modelyard.containers.agent import Agent
from modelyard.containers.custom.adapter import CustomAdapter
from modelyard.containers.custom.process import CustomContainerProcess
from modelyard.containers.process import restart_on_failure
from modelyard.local import LocalFleet
from modelyard.placement import registry
from modelyard.placement.model import Container, ModelVersion

T = TypeVar("T")


class FleetThread:
    """Runs `setup(fleet)` on a background loop; `call()` runs more coroutines there; `stop()` tears down."""

    def __init__(self, workdir: Path, store_url: str, containers: int = 2) -> None:
        self.fleet = LocalFleet(workdir=workdir, store_url=store_url, containers=containers, port=0)
        self.fleet.model_store = workdir.parent  # tests keep model folders next to the fleet's workdir
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


def start_custom_fleet(
    workdir: Path,
    models: list[ModelVersion],
    *,
    store_url: str | None = None,
    containers: int = 1,
    controller: bool = True,
    eager: bool = True,
    lease_ttl_s: float = 10.0,
    copy_target_rps: float = 0.0,
    scale_down_after_s: float = 300.0,
    custom_memory_bytes: int | None = None,
    max_inflight: int = 0,
) -> FleetThread:
    """Our own containers (real processes), their agents, the router and — unless told not to — the
    placement controller (placing models when registered, or with `eager` False only when a call wants
    them), with `models` registered and ready. Stop it with `.stop()`."""
    thread = FleetThread(workdir, store_url or str(workdir / "store"), containers=0)
    thread.fleet.custom_containers = containers
    thread.fleet.lease_ttl_s = lease_ttl_s
    thread.fleet.copy_target_rps = copy_target_rps
    thread.fleet.scale_down_after_s = scale_down_after_s
    thread.fleet.max_inflight = max_inflight
    if custom_memory_bytes is not None:
        thread.fleet.custom_memory_bytes = custom_memory_bytes

    async def setup(fleet: LocalFleet) -> None:
        await fleet.start_store_and_models(examples=False)
        for model in models:
            await registry.register_model(fleet.store, model)
        await fleet.start_containers()
        if controller:
            fleet.start_controller(eager=eager)
        await fleet.start_router()
        if controller:  # calls made right after setup must find a leading controller in the router's view
            assert fleet.router is not None
            table = fleet.router.router.table
            async with asyncio.timeout(60):
                while not table.fleet.leader:
                    await table.wait_changed(registry.LEADER, 1.0)
        # ... and every container registered: a model registered by the test must find room at once (else
        # the controller answers its cold call "no custom container is up", UNAVAILABLE).
        assert fleet.router is not None
        table = fleet.router.router.table
        async with asyncio.timeout(60):
            while len(table.fleet.containers) < containers:
                await table.wait_changed(registry.CONTAINERS, 1.0)
        if models:
            await fleet.wait_ready(models, timeout_s=60)

    try:
        thread.start(setup)
    except BaseException:
        thread.stop()
        raise
    return thread


async def add_custom_container(fleet: LocalFleet) -> Agent:
    """Starts one more of our containers (a real process) with its agent in a running fleet, supervised as
    `supervise_containers` does (call it on the fleet's loop)."""
    i = len(fleet.customs)
    process = CustomContainerProcess(
        fleet.workdir / "containers" / f"custom-{i}",
        fleet.custom_memory_bytes,
        fleet_secret_file=fleet.fleet_secret_file,
        model_store=(fleet.model_store or fleet.workdir).resolve(),
    )
    fleet.customs.append(process)  # stopped with the fleet even if what follows fails
    await asyncio.to_thread(process.start)
    container = Container(
        f"custom-{i}", process.address, kind="cpu", memory_bytes=process.memory_bytes, backend="custom"
    )
    agent = Agent(
        fleet.store,
        container,
        CustomAdapter(process.address, fleet_secret=fleet.fleet_secret),
        lease_ttl_s=fleet.lease_ttl_s,
        follower=fleet.follower,
    )
    fleet.agents.append(agent)
    task = restart_on_failure(f"agent {container.id}", agent.run)
    fleet._tasks.append(asyncio.create_task(task, name=f"agent-{container.id}"))
    supervise = fleet._supervise(process, agent)
    fleet._tasks.append(asyncio.create_task(supervise, name=f"supervise-{container.id}"))
    return agent
