"""Lazy load through the router onto our own container (a real process): the first call loads the model."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from modelyard.numpy_container.numpy_model import write_model_dir
from modelyard.placement import registry
from modelyard.placement.model import ModelVersion
from tests.fleet import FleetThread, start_custom_fleet


def scale_model(root: Path, name: str, factor: float) -> ModelVersion:
    path = write_model_dir(
        root / name,
        "scale",
        {"factor": np.array([factor], dtype=np.float32)},
        inputs=[{"name": "INPUT", "datatype": "FP32", "shape": [-1]}],
        outputs=[{"name": "OUTPUT", "datatype": "FP32", "shape": [-1]}],
    )
    return ModelVersion(name, "1", backend="custom", memory_bytes=1024, artifact_uri=path.resolve().as_uri())


@pytest.fixture
def fleet(tmp_path: Path) -> Iterator[FleetThread]:
    """One of our containers, the router and a controller that places a model only when a call wants it."""
    thread = start_custom_fleet(tmp_path / "fleet", [], eager=False)
    yield thread
    thread.stop()


def register(fleet: FleetThread, model: ModelVersion) -> None:
    fleet.call(registry.register_model(fleet.fleet.store, model))
    router = fleet.fleet.router
    assert router is not None
    deadline = time.monotonic() + 5
    while model.key not in router.router.table.fleet.models:  # the router follows the store's watch
        assert time.monotonic() < deadline
        time.sleep(0.01)


def infer(address: str, name: str, x: np.ndarray, timeout_s: float = 10) -> np.ndarray:
    tensor = grpcclient.InferInput("INPUT", [x.size], "FP32")
    tensor.set_data_from_numpy(x)
    with grpcclient.InferenceServerClient(address) as client:
        return client.infer(name, [tensor], client_timeout=timeout_s).as_numpy("OUTPUT")


def test_first_call_to_a_cold_model_loads_it_and_answers(fleet: FleetThread, tmp_path: Path) -> None:
    register(fleet, scale_model(tmp_path / "models", "cold", 3.0))
    agent = fleet.fleet.agents[0]
    assert agent.load_calls == 0
    x = np.array([1.0, -2.0], dtype=np.float32)
    started = time.perf_counter()
    out = infer(fleet.address, "cold", x)
    first_s = time.perf_counter() - started
    np.testing.assert_allclose(out, x * 3.0)
    assert agent.load_calls == 1
    print(f"\nfirst call to a cold model: {first_s * 1000:.0f} ms")
    np.testing.assert_allclose(infer(fleet.address, "cold", x), x * 3.0)
    assert agent.load_calls == 1  # warm now


def test_fifty_concurrent_first_calls_trigger_exactly_one_load(fleet: FleetThread, tmp_path: Path) -> None:
    register(fleet, scale_model(tmp_path / "models", "herd", 0.5))
    x = np.arange(4, dtype=np.float32)
    with ThreadPoolExecutor(50) as pool:
        results = list(pool.map(lambda _: infer(fleet.address, "herd", x, timeout_s=30), range(50)))
    assert all(np.allclose(r, x * 0.5) for r in results)
    router = fleet.fleet.router
    assert router is not None
    assert router.router.lazy.placements == 1
    assert fleet.fleet.agents[0].load_calls == 1


def test_a_cold_model_that_cannot_load_fails_fast_with_the_reason(fleet: FleetThread, tmp_path: Path) -> None:
    broken = scale_model(tmp_path / "models", "broken", 1.0)
    (Path(broken.artifact_uri.removeprefix("file://")) / "weights.npz").write_bytes(b"not numpy")
    register(fleet, broken)
    started = time.monotonic()
    with pytest.raises(Exception) as caught:
        infer(fleet.address, "broken", np.ones(2, dtype=np.float32), timeout_s=20)
    assert time.monotonic() - started < 10  # the failure is reported, not waited out
    assert "UNAVAILABLE" in str(caught.value) and "failed to load" in str(caught.value)


def test_a_failing_load_is_retried_with_backoff_not_in_a_loop(fleet: FleetThread, tmp_path: Path) -> None:
    broken = scale_model(tmp_path / "models", "flaky", 1.0)
    (Path(broken.artifact_uri.removeprefix("file://")) / "weights.npz").write_bytes(b"not numpy")
    agent = fleet.fleet.agents[0]

    async def assign() -> None:
        await registry.register_model(fleet.fleet.store, broken)
        generation = await registry.read_generation(fleet.fleet.store)
        await registry.write_shard_map(
            fleet.fleet.store, {broken.key: [agent.container.id]}, expected_generation=generation
        )

    before = agent.load_calls
    started = time.monotonic()
    fleet.call(assign())
    # Backoff 1 s, 2 s, 4 s ...: the third try comes no sooner than ~3 s after the first; a hot loop would
    # make it within milliseconds. Wait for the third try (generous ceiling), then check when it came.
    deadline = started + 60
    while agent.load_calls - before < 3:
        assert time.monotonic() < deadline, agent.load_calls - before
        time.sleep(0.05)
    assert time.monotonic() - started >= 2.5

    async def state() -> str:
        fleet_now = await registry.load_fleet(fleet.fleet.store)
        copy = fleet_now.states[(agent.container.id, broken.key)]
        return f"{copy.phase}: {copy.message}"

    # The third try is under way or done: its failure is reported with the reason.
    deadline = time.monotonic() + 30
    while not (reported := fleet.call(state())).startswith("failed: "):
        assert time.monotonic() < deadline, reported
        time.sleep(0.05)


def test_a_cold_call_waits_no_longer_than_its_deadline_and_the_load_goes_on(
    fleet: FleetThread, tmp_path: Path
) -> None:
    register(fleet, scale_model(tmp_path / "models", "slowpoke", 7.0))
    x = np.ones(2, dtype=np.float32)
    container = fleet.fleet.customs[0].process
    assert container is not None
    # The container, stopped, takes the load and cannot finish it: the cold call's deadline comes first.
    # (A placement and load on this machine can take under 30 ms, so a short deadline alone proves nothing.)
    os.kill(container.pid, signal.SIGSTOP)
    try:
        started = time.monotonic()
        with pytest.raises(InferenceServerException) as caught:
            infer(fleet.address, "slowpoke", x, timeout_s=0.5)
        waited_s = time.monotonic() - started
    finally:
        os.kill(container.pid, signal.SIGCONT)
    assert caught.value.status() == "StatusCode.DEADLINE_EXCEEDED"
    assert waited_s < 1.5
    np.testing.assert_allclose(infer(fleet.address, "slowpoke", x, timeout_s=10), x * 7.0)
    assert fleet.fleet.agents[0].load_calls == 1  # the first caller giving up did not cancel its load


def test_without_a_controller_a_cold_call_fails_fast_naming_the_missing_controller(tmp_path: Path) -> None:
    thread = start_custom_fleet(tmp_path / "fleet", [], controller=False)
    try:
        register(thread, scale_model(tmp_path / "models", "orphan", 2.0))
        started = time.monotonic()
        with pytest.raises(InferenceServerException) as caught:
            infer(thread.address, "orphan", np.ones(2, dtype=np.float32), timeout_s=20)
        assert time.monotonic() - started < 2.0  # not waited out
        assert caught.value.status() == "StatusCode.FAILED_PRECONDITION"
        assert "no placement controller" in str(caught.value)
        assert thread.fleet.agents[0].load_calls == 0
    finally:
        thread.stop()


def test_a_cold_model_too_big_for_every_container_fails_with_the_controllers_reason(
    fleet: FleetThread, tmp_path: Path
) -> None:
    huge = scale_model(tmp_path / "models", "huge", 1.0)
    register(
        fleet,
        ModelVersion(huge.name, "1", backend="custom", memory_bytes=1 << 50, artifact_uri=huge.artifact_uri),
    )
    started = time.monotonic()
    with pytest.raises(InferenceServerException) as caught:
        infer(fleet.address, "huge", np.ones(2, dtype=np.float32), timeout_s=20)
    assert time.monotonic() - started < 5.0
    assert caught.value.status() == "StatusCode.UNAVAILABLE"
    assert "cannot be placed" in str(caught.value)
    assert fleet.fleet.agents[0].load_calls == 0


def test_a_cold_call_while_the_only_container_is_down_says_no_container_is_up(
    fleet: FleetThread, tmp_path: Path
) -> None:
    """Not "no custom container can make room for N bytes": there is room, and nothing to hold it."""
    router, controller = fleet.fleet.router, fleet.fleet.controller
    assert router is not None and controller is not None

    def registered() -> set[str]:
        """The containers both the router and the controller know (each follows the store)."""
        return set(router.router.table.fleet.containers) & set(controller.follower.fleet.containers)

    def wait_until(condition: Callable[[], bool], what: str) -> None:
        deadline = time.monotonic() + 30
        while not condition():
            assert time.monotonic() < deadline, f"{what}: not within 30 s"
            time.sleep(0.05)

    wait_until(lambda: registered() == {"custom-0"}, "the container registered")
    process = fleet.fleet.customs[0].process
    assert process is not None
    os.kill(process.pid, signal.SIGKILL)
    # Its agent finds it gone and withdraws it; seen by the router and by the controller.
    wait_until(lambda: not router.router.table.fleet.containers, "the router seeing it withdrawn")
    wait_until(lambda: not controller.follower.fleet.containers, "the controller seeing it withdrawn")
    register(fleet, scale_model(tmp_path / "models", "cold", 3.0))
    started = time.monotonic()
    with pytest.raises(InferenceServerException) as caught:
        infer(fleet.address, "cold", np.ones(2, dtype=np.float32), timeout_s=20)
    message = caught.value.message()
    assert time.monotonic() - started < 10  # said, not waited out
    assert caught.value.status() == "StatusCode.UNAVAILABLE"
    assert "model 'cold' version '1' cannot be placed: no custom container is up" in message, message
    assert "make room" not in message
