"""Unary failover: a copy whose container just died answers UNAVAILABLE, and the call lands on another."""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tritonclient.grpc as grpcclient

from tests.conftest import stop_process
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


@contextlib.contextmanager
def steady_calls(
    address: str, model: str, factor: float, workdir: Path, wait_for_ready: bool = False
) -> Iterator[dict[str, Any]]:
    """Calls `model` every ~20 ms from its own process (tests/unary_load.py) while the block runs; the
    yielded dict gets the client's figures when the block ends."""
    stop_file = workdir / "stop-load"
    command = [sys.executable, "-m", "tests.unary_load", address, model, str(factor), str(stop_file)]
    command += ["--wait-for-ready"] if wait_for_ready else []
    process = subprocess.Popen(command, stdout=subprocess.PIPE, text=True, start_new_session=True)
    figures: dict[str, Any] = {}
    try:
        assert process.stdout is not None
        assert process.stdout.readline().strip() == "ready"
        yield figures
        stop_file.touch()
        out, _ = process.communicate(timeout=30)
        figures.update(json.loads(out.strip().splitlines()[-1]))
    finally:
        if process.poll() is None:
            stop_process(process)  # type: ignore[arg-type]


def inference_count(client: grpcclient.InferenceServerClient, model: str) -> int:
    stats = client.get_inference_statistics(model, as_json=True)["model_stats"]
    return sum(int(s.get("inference_count", 0)) for s in stats)


@pytest.fixture
def single_copy_fleet(tmp_path: Path) -> Iterator[FleetThread]:
    thread = start_custom_fleet(
        tmp_path / "fleet", [scale_model(tmp_path / "models", "one", 4.0)], containers=2
    )
    yield thread
    thread.stop()


def test_calls_to_a_single_copy_model_wait_for_its_replacement_when_its_container_dies(
    single_copy_fleet: FleetThread, tmp_path: Path
) -> None:
    fleet = single_copy_fleet
    router = fleet.fleet.router
    assert router is not None
    (copy,) = router.router.table.ready_copies("one@1")
    victim = next(c for c in fleet.fleet.customs if c.address == copy.address)
    assert victim.process is not None
    with steady_calls(fleet.address, "one", 4.0, tmp_path) as figures:
        killed_at = time.monotonic()
        victim.process.kill()
        victim.process.wait()
        # The controller re-places the copy on the other container once the dead one's agent withdraws it.
        deadline = time.monotonic() + 30
        while not any(c.id != copy.id for c in router.router.table.ready_copies("one@1")):
            assert time.monotonic() < deadline, "the copy was never re-placed"
            time.sleep(0.05)
        replaced_s = time.monotonic() - killed_at
        # Keep calling until the new copy has answered 25 (its statistics, asked through the router).
        with grpcclient.InferenceServerClient(fleet.address) as client:
            while inference_count(client, "one") < 25:
                assert time.monotonic() < deadline, "the new copy answered too few calls"
                time.sleep(0.05)
    print(f"re-placed after {replaced_s:.1f} s; client figures: {figures}")
    assert figures["calls"] > 0
    assert figures["failed"] == {}, figures["failures"][:5]
    assert figures["wrong"] == 0
    # Some calls were refused by the dead container and waited for the new copy (else nothing was tested).
    assert router.router.retries > 0


@pytest.fixture
def lone_container_fleet(tmp_path: Path) -> Iterator[FleetThread]:
    """One of our containers, restarted when it dies (as `modelyard up` does): nowhere else to re-place."""
    thread = start_custom_fleet(
        tmp_path / "fleet", [scale_model(tmp_path / "models", "one", 4.0)], containers=1
    )

    async def supervise() -> None:
        thread.fleet.supervise_containers()  # its tasks run on the fleet's loop

    thread.call(supervise())
    yield thread
    thread.stop()


def test_calls_wait_for_their_container_to_be_restarted_when_it_is_the_only_one(
    lone_container_fleet: FleetThread, tmp_path: Path
) -> None:
    fleet = lone_container_fleet
    router = fleet.fleet.router
    assert router is not None
    victim = fleet.fleet.customs[0]
    assert victim.process is not None
    pid = victim.process.pid
    with steady_calls(fleet.address, "one", 4.0, tmp_path) as figures:
        killed_at = time.monotonic()
        victim.process.kill()
        deadline = time.monotonic() + 30
        while victim.process.pid == pid or not router.router.table.ready_copies("one@1"):
            assert time.monotonic() < deadline, "the container was not restarted with its copy"
            time.sleep(0.05)
        back_s = time.monotonic() - killed_at
        with grpcclient.InferenceServerClient(fleet.address) as client:
            while inference_count(client, "one") < 25:  # the restarted container's own count
                assert time.monotonic() < deadline, "the restarted copy answered too few calls"
                time.sleep(0.05)
    print(f"copy ready again after {back_s:.1f} s; client figures: {figures}")
    assert fleet.fleet.restarts["custom-0"] == 1
    assert figures["failed"] == {}, figures["failures"][:5]
    assert figures["wrong"] == 0
    # Calls come every 20 ms; the container is down for at least its 0.5-s restart backoff: a call made
    # while it was down waited for the restarted copy (sent again there if it had reached the dead one).
    assert figures["slowest_s"] >= 0.3, figures
