"""`modelyard up` heals itself: a container killed with SIGKILL is restarted and its models are served
again through the router; the placement controller, not `up`, places the models.

One Triton and one of our containers, so no model has anywhere else to go: only the restart brings them
back.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import time
from collections.abc import Iterator

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from modelyard.containers.custom.process import CustomContainerProcess
from modelyard.containers.triton.server import TritonServer
from modelyard.local import LocalFleet
from modelyard.placement import registry
from tests.conftest import require_triton
from tests.fleet import FleetThread

RECOVERY_CEILING_S = 30.0


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FleetThread]:
    require_triton()
    workdir = tmp_path_factory.mktemp("healing")
    thread = FleetThread(workdir, str(workdir / "store"), containers=1)
    thread.fleet.custom_containers = 1

    async def setup(fleet: LocalFleet) -> None:
        await fleet.start()

    try:
        thread.start(setup)
        yield thread
    finally:
        thread.stop()


def call(address: str, model: str) -> np.ndarray:
    """One call through the router: `scale` doubles [1, 2, 3]; `linear` maps a 4-vector to 2 values."""
    shape = [3] if model == "scale" else [1, 4]
    tensor = grpcclient.InferInput("INPUT", shape, "FP32")
    tensor.set_data_from_numpy(np.arange(1, 1 + int(np.prod(shape)), dtype=np.float32).reshape(shape))
    with grpcclient.InferenceServerClient(address) as client:
        return client.infer(model, [tensor], client_timeout=5).as_numpy("OUTPUT")


def answered_again(fleet: FleetThread, model: str, killed_at: float, expected: np.ndarray) -> float:
    """Seconds from the kill until a call through the router for `model` answers `expected` again."""
    last = ""
    while time.monotonic() - killed_at < RECOVERY_CEILING_S:
        try:
            out = call(fleet.address, model)
            np.testing.assert_allclose(out, expected)
            return time.monotonic() - killed_at
        except InferenceServerException as exc:
            last = f"{exc.status()}: {exc.message()}"
        time.sleep(0.2)
    raise AssertionError(f"{model} not served within {RECOVERY_CEILING_S:.0f} s of the kill; last: {last}")


def kill(process: TritonServer | CustomContainerProcess) -> tuple[int, float]:
    assert process.process is not None
    pid = process.process.pid
    os.kill(pid, signal.SIGKILL)
    return pid, time.monotonic()


def test_the_placement_controller_places_the_example_models(fleet: FleetThread) -> None:
    controller = fleet.fleet.controller
    assert controller is not None
    assert controller.rounds >= 1  # `up` wrote no map: the controller's rebalance placed every model

    async def assignments() -> dict[str, tuple[str, ...]]:
        return (await registry.load_fleet(fleet.fleet.store)).assignments

    placed = fleet.call(assignments())
    assert placed["scale@1"] == ("triton-0",) and placed["linear@1"] == ("custom-0",)


def test_a_killed_triton_is_restarted_and_serves_its_models_again(
    fleet: FleetThread, caplog: pytest.LogCaptureFixture
) -> None:
    expected = call(fleet.address, "scale")
    np.testing.assert_allclose(expected, [2.0, 4.0, 6.0])
    triton = fleet.fleet.tritons[0]
    address = triton.address
    with caplog.at_level(logging.WARNING, logger="modelyard.local"):
        pid, killed_at = kill(triton)
        recovered_s = answered_again(fleet, "scale", killed_at, expected)
    print(f"\ntriton-0 killed: scale answered again after {recovered_s:.1f} s")
    assert triton.process is not None and triton.process.pid != pid
    assert triton.address == address  # the port was free: same address
    assert fleet.fleet.restarts["triton-0"] == 1
    restarts = [r.getMessage() for r in caplog.records if r.name == "modelyard.local"]
    assert len(restarts) == 1 and f"(pid {pid}) killed by SIGKILL" in restarts[0], restarts


def test_a_killed_custom_container_is_restarted_and_serves_its_models_again(fleet: FleetThread) -> None:
    expected = call(fleet.address, "linear")
    custom = fleet.fleet.customs[0]
    before = fleet.fleet.restarts["custom-0"]
    pid, killed_at = kill(custom)
    recovered_s = answered_again(fleet, "linear", killed_at, expected)
    print(f"\ncustom-0 killed: linear answered again after {recovered_s:.1f} s")
    assert custom.process is not None and custom.process.pid != pid
    assert fleet.fleet.restarts["custom-0"] == before + 1


def test_a_container_whose_port_was_taken_comes_back_at_a_new_address(fleet: FleetThread) -> None:
    expected = call(fleet.address, "linear")
    custom = fleet.fleet.customs[0]
    old_port = custom.port
    with socket.socket() as squatter:
        _, killed_at = kill(custom)
        squatter.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        # Taken as soon as the dead container lets go, before the restart (after 0.5 s of backoff) can.
        deadline = time.monotonic() + 0.4
        while True:
            try:
                squatter.bind(("127.0.0.1", old_port))
                break
            except OSError:
                assert time.monotonic() < deadline, "the killed container kept its port"
                time.sleep(0.005)
        squatter.listen()
        recovered_s = answered_again(fleet, "linear", killed_at, expected)
    print(f"\ncustom-0 killed, port taken: linear answered again after {recovered_s:.1f} s")
    assert custom.port != old_port

    async def registered_address() -> str:
        return (await registry.load_fleet(fleet.fleet.store)).containers["custom-0"].address

    assert fleet.call(registered_address()) == f"127.0.0.1:{custom.port}"
