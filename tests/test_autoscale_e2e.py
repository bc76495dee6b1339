"""Copies follow load and memory as a cache, end to end: our containers (real processes), agents, the
router and the placement controller, with load from a separate process.

Periods are short so the tests are quick: routers report rates every 0.5 s, a copy is wanted above 10
calls/s per copy and an extra one goes after 3 s below half that.
"""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient

from modelyard.numpy_container.numpy_model import write_model_dir
from modelyard.placement.model import ModelVersion
from modelyard.placement.registry import Fleet
from tests.fleet import FleetThread, start_custom_fleet

SCALE_BYTES = 4  # a `scale` model's weights: one float32


def scale_model(root: Path, name: str, factor: float, **settings: int) -> ModelVersion:
    path = write_model_dir(
        root / name,
        "scale",
        {"factor": np.array([factor], dtype=np.float32)},
        inputs=[{"name": "INPUT", "datatype": "FP32", "shape": [-1]}],
        outputs=[{"name": "OUTPUT", "datatype": "FP32", "shape": [-1]}],
    )
    return ModelVersion(
        name,
        "1",
        backend="custom",
        memory_bytes=SCALE_BYTES,
        artifact_uri=path.resolve().as_uri(),
        **settings,  # type: ignore[arg-type]
    )


def wait_for(
    fleet: FleetThread, condition: Callable[[Fleet], bool], what: str, timeout_s: float = 60
) -> None:
    """Polls the router's view of the store (an in-memory read) until `condition` holds."""
    router = fleet.fleet.router
    assert router is not None
    deadline = time.monotonic() + timeout_s
    while not condition(router.router.table.fleet):
        assert time.monotonic() < deadline, (
            f"not within {timeout_s} s: {what} ({_copies(router.router.table.fleet)})"
        )
        time.sleep(0.05)


def _copies(fleet: Fleet) -> str:
    """The map and copy states, for a failure's message."""
    return f"assignments {fleet.assignments}, states {fleet.states}"


def infer(address: str, name: str, x: np.ndarray, timeout_s: float = 30) -> np.ndarray:
    tensor = grpcclient.InferInput("INPUT", [x.size], "FP32")
    tensor.set_data_from_numpy(x)
    with grpcclient.InferenceServerClient(address) as client:
        return client.infer(name, [tensor], client_timeout=timeout_s).as_numpy("OUTPUT")


@pytest.fixture
def short_rate_period(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MODELYARD_RATE_PERIOD_S", "0.5")  # read by `up` (local.py), as a user sets it


@pytest.fixture
def load_fleet(tmp_path: Path, short_rate_period: None) -> Iterator[tuple[FleetThread, ModelVersion]]:
    hot = scale_model(tmp_path / "models", "hot", 2.0, replicas=1, max_replicas=2)
    thread = start_custom_fleet(
        tmp_path / "fleet", [hot], containers=2, copy_target_rps=10, scale_down_after_s=3
    )
    yield thread, hot
    thread.stop()


def test_a_model_gains_a_copy_under_load_and_loses_it_after_with_no_failed_call(
    load_fleet: tuple[FleetThread, ModelVersion], tmp_path: Path
) -> None:
    fleet, hot = load_fleet
    wait_for(fleet, lambda f: len(f.ready_on(hot.key)) == 1, "one ready copy")
    slow, stop = tmp_path / "slow", tmp_path / "stop"
    load = subprocess.Popen(
        [
            *(sys.executable, "-m", "tests.paced_load", fleet.address, hot.name, "2.0"),
            *("0.02", str(slow), "0.5", str(stop)),  # ~8 threads x 1/0.02 s, then ~2 calls/s
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert load.stdout is not None and load.stdout.readline().strip() == "ready"
        # Far above 10 calls/s on one copy: a second copy, on the other container, becomes ready.
        wait_for(fleet, lambda f: len(f.ready_on(hot.key)) == 2, "a second ready copy under load")
        added = time.monotonic()
        slow.touch()
        # ~2 calls/s stays below 0.5 x 10 on one copy: after 3 s the extra copy leaves the map, drains
        # while the slow calls go on, and is unloaded.
        wait_for(fleet, lambda f: len(f.assignments.get(hot.key, ())) == 1, "the extra copy removed")
        assert time.monotonic() - added >= 3.0
        wait_for(
            fleet,
            lambda f: sum(1 for (_, key) in f.states if key == hot.key) == 1,
            "the extra copy drained and unloaded",
        )
        # The remaining copy answers after the other one left (a call of ours, not a wait for the load's).
        assert infer(fleet.address, hot.name, np.array([1.0, 2.0], dtype=np.float32)).tolist() == [2.0, 4.0]
    finally:
        stop.touch()
        out, _ = load.communicate(timeout=60)
    result = json.loads(out.strip().splitlines()[-1])
    assert result["calls"] > 100
    assert result["failed"] == {} and result["wrong"] == 0, result["failures"][:5]
    controller = fleet.fleet.controller
    assert controller is not None
    actions = [line.split()[1] for line in controller.autoscaler.decisions]
    assert actions.count("add") == 1 and actions.count("remove") == 1, list(controller.autoscaler.decisions)


@pytest.fixture
def cache_fleet(tmp_path: Path, short_rate_period: None) -> Iterator[tuple[FleetThread, list[ModelVersion]]]:
    """Two containers of 6 bytes: each holds one 4-byte model. One is pinned (replicas 1), so the three
    load-on-demand models share the one slot left."""
    root = tmp_path / "models"
    pinned = scale_model(root, "pinned", 1.0, replicas=1)
    lazy = [scale_model(root, f"lazy{i}", float(i + 2), replicas=0) for i in range(3)]
    thread = start_custom_fleet(
        tmp_path / "fleet", [pinned], containers=2, custom_memory_bytes=6, scale_down_after_s=3
    )
    try:
        for model in lazy:
            thread.call(_register(thread, model))
        controller = thread.fleet.controller
        assert controller is not None
        # Evict a copy once idle for 0.5 s (default 2 s): the test calls the models one after another.
        autoscaler = controller.autoscaler
        autoscaler.policy = dataclasses.replace(autoscaler.policy, evict_idle_s=0.5)
    except BaseException:
        thread.stop()
        raise
    yield thread, [pinned, *lazy]
    thread.stop()


async def _register(fleet: FleetThread, model: ModelVersion) -> None:
    from modelyard.placement import registry

    await registry.register_model(fleet.fleet.store, model)


def test_load_on_demand_models_bigger_than_the_fleet_all_answer_in_turn_by_evicting(
    cache_fleet: tuple[FleetThread, list[ModelVersion]], tmp_path: Path
) -> None:
    fleet, (pinned, *lazy) = cache_fleet
    wait_for(fleet, lambda f: all(m.key in f.models for m in lazy), "registrations followed")
    assert not any(m.key in fleet.fleet.follower.fleet.assignments for m in lazy)  # not placed until called
    x = np.array([1.0, -2.0], dtype=np.float32)
    for model in [*lazy, *lazy]:
        factor = float(model.name.removeprefix("lazy")) + 2
        np.testing.assert_allclose(infer(fleet.address, model.name, x), x * factor)
    controller = fleet.fleet.controller
    assert controller is not None
    # One slot, six calls rotating over three models: every call but the first needs one eviction.
    assert controller.autoscaler.evictions == 5
    view = fleet.fleet.follower.fleet
    assert len(view.assignments[pinned.key]) == 1  # replicas 1: never evicted
    show = subprocess.run(
        [
            *(sys.executable, "-m", "modelyard", "placement", "show", "--json"),
            *("--store", fleet.fleet.store_url),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    shown = json.loads(show.stdout)
    assert shown["autoscale"]["evictions"] == 5
    assert shown["resident_copies"] == 1 and shown["evictable_copies"] == 1
