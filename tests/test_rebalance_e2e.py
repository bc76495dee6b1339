"""Rebalancing a live fleet of real Triton containers and agents while a client keeps calling the router."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from modelyard.fleet_secret import FLEET_SECRET_HEADER
from modelyard.local import LocalFleet
from modelyard.placement import registry
from modelyard.placement.rebalance import RebalancePlan, apply_rebalance
from modelyard.placement.usage import lost_copies
from tests.conftest import require_triton
from tests.fleet import FleetThread

PLAN = {
    "add_sub@1": ["triton-0", "triton-1"],
    "scale@1": ["triton-0"],
    "identity@1": ["triton-2"],
    "stream@1": ["triton-1"],
}


@pytest.fixture
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FleetThread]:
    require_triton()
    workdir = tmp_path_factory.mktemp("rebalance")
    thread = FleetThread(workdir, str(workdir / "store"), containers=3)

    async def setup(fleet: LocalFleet) -> None:
        models = await fleet.start_store_and_models()
        await fleet.start_containers()
        await registry.write_shard_map(fleet.store, PLAN, expected_generation=0)
        await fleet.start_router()
        await fleet.wait_ready(models, timeout_s=120)

    try:
        thread.start(setup)
        yield thread
    finally:
        thread.stop()


class CallLoop:
    """Calls `scale` through the router until stopped, recording every failure."""

    def __init__(self, address: str) -> None:
        self.client = grpcclient.InferenceServerClient(address)
        self.calls = 0
        self.failures: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        x = np.arange(8, dtype=np.float32)
        tensor = grpcclient.InferInput("INPUT", [8], "FP32")
        tensor.set_data_from_numpy(x)
        while not self._stop.is_set():
            try:
                out = self.client.infer("scale", [tensor], client_timeout=10).as_numpy("OUTPUT")
                if not np.allclose(out, x * 2):
                    self.failures.append(f"wrong output {out}")
            except InferenceServerException as exc:
                self.failures.append(f"{exc.status()}: {exc.message()}")
            self.calls += 1

    def __enter__(self) -> CallLoop:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(30)
        self.client.close()


def test_moving_a_model_between_tritons_drops_no_call(fleet: FleetThread) -> None:
    async def move() -> None:
        store = fleet.fleet.store
        current = await registry.load_fleet(store)
        after = dict(current.assignments)
        after["scale@1"] = ("triton-1",)
        rebalance = RebalancePlan.between(current, dict(current.assignments), after)
        result = await apply_rebalance(store, rebalance, holder="test", ready_timeout_s=60)
        assert result.failed == {} and result.ready == 1
        # Calls go on while triton-0's agent drains and unloads its old copy (the move's second half).
        agent = next(a for a in fleet.fleet.agents if a.container.id == "triton-0")
        deadline = time.monotonic() + 30
        while "scale@1" in agent.loaded:
            assert time.monotonic() < deadline, "triton-0 kept its old copy"
            await asyncio.sleep(0.05)

    with CallLoop(fleet.address) as loop:
        fleet.call(move())
    assert loop.calls > 20
    assert loop.failures == []
    with grpcclient.InferenceServerClient(fleet.fleet.tritons[0].address) as t0:
        secret = {FLEET_SECRET_HEADER: fleet.fleet.fleet_secret}  # Triton answers only the fleet
        assert not t0.is_model_ready("scale@1", headers=secret)  # Triton names each version `name@version`
    with grpcclient.InferenceServerClient(fleet.fleet.tritons[1].address) as t1:
        assert t1.is_model_ready("scale@1", headers=secret)


def test_a_call_for_a_model_whose_container_died_waits_for_its_new_copy_and_answers(
    fleet: FleetThread,
) -> None:
    task = next(t for t in fleet.fleet._tasks if t.get_name() == "agent-triton-2")

    async def kill_triton_2() -> None:
        fleet.fleet.start_controller()  # the one writer of the map: it re-places what triton-2 held
        task.cancel()  # the agent revokes its lease on the way out, as a lease expiry would
        await asyncio.gather(task, return_exceptions=True)
        await asyncio.to_thread(fleet.fleet.tritons[2].stop)

    fleet.call(kill_triton_2())
    router = fleet.fleet.router
    assert router is not None
    deadline = time.monotonic() + 5
    while "triton-2" in router.router.table.fleet.containers and time.monotonic() < deadline:
        time.sleep(0.02)
    with grpcclient.InferenceServerClient(fleet.address) as client:
        tensor = grpcclient.InferInput("INPUT", [2], "FP32")
        tensor.set_data_from_numpy(np.ones(2, dtype=np.float32))
        # The only copy is gone: the call waits for the re-placed copy instead of failing.
        out = client.infer("identity", [tensor], client_timeout=30).as_numpy("OUTPUT")
    np.testing.assert_array_equal(out, np.ones(2, dtype=np.float32))

    async def current() -> tuple[dict[str, tuple[str, ...]], list[tuple[str, str]]]:
        fleet_now = await registry.load_fleet(fleet.fleet.store)
        return fleet_now.assignments, lost_copies(fleet_now)

    assignments, lost = fleet.call(current())
    assert lost == [] and assignments["identity@1"] in (("triton-0",), ("triton-1",))


def test_killing_a_triton_process_gets_its_models_replaced_by_the_controller(fleet: FleetThread) -> None:
    async def start_controller() -> None:
        fleet.fleet.start_controller()

    fleet.call(start_controller())
    with grpcclient.InferenceServerClient(fleet.address) as client:
        tensor = grpcclient.InferInput("INPUT", [3], "FP32")
        x = np.array([1.0, -2.0, 0.5], dtype=np.float32)
        tensor.set_data_from_numpy(x)
        np.testing.assert_array_equal(client.infer("identity", [tensor]).as_numpy("OUTPUT"), x)

        # Kill triton-2's process only: its agent notices, withdraws the container, the controller re-places.
        triton = fleet.fleet.tritons[2]
        assert triton.process is not None
        triton.process.kill()
        started = time.monotonic()
        answered = None
        while time.monotonic() - started < 60:
            try:
                answered = client.infer("identity", [tensor], client_timeout=5).as_numpy("OUTPUT")
                if time.monotonic() - started > 0.5:
                    break
            except InferenceServerException:
                pass
            time.sleep(0.1)
        assert answered is not None
        np.testing.assert_array_equal(answered, x)

    async def placement() -> dict[str, tuple[str, ...]]:
        return (await registry.load_fleet(fleet.fleet.store)).assignments

    assignments = fleet.call(placement())
    assert "triton-2" not in {cid for ids in assignments.values() for cid in ids}
    assert len(assignments["identity@1"]) == 1
