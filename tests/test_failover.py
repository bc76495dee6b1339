"""Unary failover: a copy whose container just died answers UNAVAILABLE, and the call lands on another."""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient

from tests.fleet import FleetThread, start_custom_fleet
from tests.test_lazy_load import scale_model


@pytest.fixture
def fleet(tmp_path: Path) -> Iterator[FleetThread]:
    # A 30 s lease: the agent notices the dead container late, so the router must cope on its own meanwhile.
    model = replace(scale_model(tmp_path / "models", "m", 3.0), replicas=2)
    thread = start_custom_fleet(tmp_path / "fleet", [model], containers=2, lease_ttl_s=30.0)
    yield thread
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
