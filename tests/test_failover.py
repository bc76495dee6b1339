"""Unary failover: a copy whose container just died answers UNAVAILABLE, and the call lands on another."""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient

from modelyard.local import LocalFleet
from placement import registry
from tests.fleet import FleetThread
from tests.test_lazy_load import scale_model


@pytest.fixture
def fleet(tmp_path: Path) -> Iterator[FleetThread]:
    thread = FleetThread(tmp_path / "fleet", str(tmp_path / "fleet" / "store"), containers=0)
    thread.fleet.custom_containers = 2
    thread.fleet.lease_ttl_s = 30.0  # the agent notices late: the router must cope on its own meanwhile

    async def setup(fleet: LocalFleet) -> None:
        await fleet.start_store_and_models(examples=False)
        model = replace(scale_model(tmp_path / "models", "m", 3.0), replicas=2)
        await registry.register_model(fleet.store, model)
        await fleet.start_containers()
        fleet.start_controller()
        await fleet.start_router()
        await fleet.wait_ready([model], timeout_s=60)

    try:
        thread.start(setup)
        yield thread
    finally:
        thread.stop()


def test_calls_retry_once_on_another_copy_when_a_container_dies(fleet: FleetThread) -> None:
    router = fleet.fleet.router
    assert router is not None
    assert len(router.router.table.ready_copies("m@1")) == 2
    victim = fleet.fleet.customs[0]
    assert victim.process is not None
    victim.process.kill()
    victim.process.wait()
    tensor = grpcclient.InferInput("INPUT", [2], "FP32")
    tensor.set_data_from_numpy(np.array([1.0, 2.0], dtype=np.float32))
    started = time.monotonic()
    with grpcclient.InferenceServerClient(fleet.address) as client:
        answers = [client.infer("m", [tensor], client_timeout=10).as_numpy("OUTPUT") for _ in range(40)]
    assert all(np.allclose(a, [3.0, 6.0]) for a in answers)
    # The dead copy was still listed as ready for these calls (the agent's 30 s lease had not run out) ...
    assert time.monotonic() - started < 10
    assert len(router.router.table.ready_copies("m@1")) == 2
    # ... so some were sent to it, failed with UNAVAILABLE before running, and went to the other copy.
    assert router.router.retries > 0
