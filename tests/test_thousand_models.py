"""1,000 registered models over 4 of our containers plus 2 Triton instances, all answering through the
router; killing one container's process gets its models re-placed and answering again."""

from __future__ import annotations

import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from backends.numpy_model import write_model_dir
from modelyard.local import LocalFleet
from placement import registry
from placement.model import ModelVersion
from tests.conftest import require_triton
from tests.fleet import FleetThread

COUNT = 1000


def factor(i: int) -> float:
    return 1.0 + i / 100


def register_scale_models(fleet: LocalFleet, artifacts: Path) -> list[ModelVersion]:
    models = []
    for i in range(COUNT):
        path = write_model_dir(
            artifacts / f"m{i:04d}",
            "scale",
            {"factor": np.array([factor(i)], dtype=np.float32)},
            inputs=[{"name": "INPUT", "datatype": "FP32", "shape": [-1]}],
            outputs=[{"name": "OUTPUT", "datatype": "FP32", "shape": [-1]}],
        )
        models.append(
            ModelVersion(
                f"m{i:04d}", "1", backend="custom", memory_bytes=4096, artifact_uri=path.resolve().as_uri()
            )
        )
    return models


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FleetThread]:
    require_triton()
    workdir = tmp_path_factory.mktemp("thousand")
    thread = FleetThread(workdir, str(workdir / "store"), containers=2)
    thread.fleet.custom_containers = 4
    thread.fleet.custom_memory_bytes = 64 * 1024 * 1024
    thread.fleet.lease_ttl_s = 3.0

    async def setup(fleet: LocalFleet) -> None:
        examples = await fleet.start_store_and_models()
        models = register_scale_models(fleet, workdir / "numpy-models")
        await fleet.store.apply({registry.MODELS + m.key: m.to_json() for m in models})
        await fleet.start_containers()
        fleet.start_controller()  # places everything registered, re-places what dies
        await fleet.start_router()
        await fleet.wait_ready(examples + models, timeout_s=180)

    try:
        thread.start(setup)
        yield thread
    finally:
        thread.stop()


def call(address: str, names: list[str]) -> list[tuple[str, np.ndarray | str]]:
    x = np.array([1.0, 2.0, -4.0], dtype=np.float32)
    tensor = grpcclient.InferInput("INPUT", [3], "FP32")
    tensor.set_data_from_numpy(x)
    out: list[tuple[str, np.ndarray | str]] = []
    with grpcclient.InferenceServerClient(address) as client:
        for name in names:
            try:
                out.append((name, client.infer(name, [tensor], client_timeout=30).as_numpy("OUTPUT")))
            except InferenceServerException as exc:
                out.append((name, f"{exc.status()}: {exc.message()}"))
    return out


def check_all(address: str) -> list[str]:
    """Calls every numpy model (4 client threads) and returns the failures."""
    names = [f"m{i:04d}" for i in range(COUNT)]
    with ThreadPoolExecutor(4) as pool:
        results = [r for chunk in pool.map(lambda k: call(address, names[k::4]), range(4)) for r in chunk]
    x = np.array([1.0, 2.0, -4.0], dtype=np.float32)
    failures = []
    for name, got in results:
        expected = x * np.float32(factor(int(name[1:])))
        if isinstance(got, str) or not np.allclose(got, expected):
            failures.append(f"{name}: {got}")
    return failures


def test_every_one_of_a_thousand_models_answers_through_the_router(fleet: FleetThread) -> None:
    copies_per_container = {
        a.container.id: sum(1 for key in a.loaded if key.startswith("m") and key[1:5].isdigit())
        for a in fleet.fleet.agents
    }
    assert sum(n for cid, n in copies_per_container.items() if cid.startswith("custom-")) == COUNT
    assert all(copies_per_container[f"custom-{i}"] > 100 for i in range(4)), copies_per_container
    assert check_all(fleet.address) == []
    with grpcclient.InferenceServerClient(fleet.address) as client:  # the Triton models are served too
        a = np.arange(4, dtype=np.float32)
        inputs = []
        for name in ("INPUT0", "INPUT1"):
            tensor = grpcclient.InferInput(name, [4], "FP32")
            tensor.set_data_from_numpy(a)
            inputs.append(tensor)
        np.testing.assert_allclose(client.infer("add_sub", inputs).as_numpy("OUTPUT0"), a + a)


def test_killing_a_container_process_gets_its_models_replaced_and_answering(fleet: FleetThread) -> None:
    victim = fleet.fleet.customs[1]
    agent = next(a for a in fleet.fleet.agents if a.container.id == "custom-1")
    moved = set(agent.loaded)
    assert len(moved) > 100
    assert victim.process is not None
    victim.process.kill()

    async def replaced() -> bool:
        fleet_now = await registry.load_fleet(fleet.fleet.store)
        return all(
            "custom-1" not in fleet_now.assignments.get(key, ("custom-1",))
            and any(
                (s := fleet_now.states.get((cid, key))) is not None and s.phase == "ready"
                for cid in fleet_now.assignments[key]
            )
            for key in moved
        )

    started = time.monotonic()
    while not fleet.call(replaced()):
        assert time.monotonic() - started < 120, "copies of the killed container were not re-placed"
        time.sleep(0.5)
    print(f"\n{len(moved)} models re-placed and ready {time.monotonic() - started:.1f} s after the kill")
    deadline = time.monotonic() + 10  # the router follows the store's watch
    while (failures := check_all(fleet.address)) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert failures == []
