"""Router health and reflection, and serving through a store outage (real etcd, stopped and restarted)."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

from tests.conftest import EtcdServer
from tests.fleet import FleetThread, start_custom_fleet
from tests.test_lazy_load import scale_model

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


@pytest.fixture
def etcd(tmp_path: Path) -> Iterator[EtcdServer]:
    server = EtcdServer(tmp_path / "etcd")
    server.workdir.mkdir()
    try:
        server.start()
        yield server
    finally:
        server.stop()


@pytest.fixture
def fleet(tmp_path: Path, etcd: EtcdServer) -> Iterator[FleetThread]:
    thread = start_custom_fleet(
        tmp_path / "fleet", [scale_model(tmp_path / "models", "m", 4.0)], store_url=etcd.url
    )
    yield thread
    thread.stop()


def health(address: str, service: str) -> int:
    with grpc.insecure_channel(address) as channel:
        request = health_pb2.HealthCheckRequest(service=service)
        return health_pb2_grpc.HealthStub(channel).Check(request, timeout=5).status


def wait_for(check, timeout_s: float = 15.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout_s
    while not check():
        assert time.monotonic() < deadline
        time.sleep(0.1)


def infer(address: str) -> np.ndarray:
    tensor = grpcclient.InferInput("INPUT", [2], "FP32")
    tensor.set_data_from_numpy(np.array([1.0, 2.0], dtype=np.float32))
    with grpcclient.InferenceServerClient(address) as client:
        return client.infer("m", [tensor], client_timeout=10).as_numpy("OUTPUT")


def test_with_the_store_down_the_router_keeps_serving_and_reports_degraded(
    fleet: FleetThread, etcd: EtcdServer
) -> None:
    assert health(fleet.address, "") == SERVING
    assert health(fleet.address, "modelyard.store") == SERVING
    etcd.stop()
    wait_for(lambda: health(fleet.address, "modelyard.store") == NOT_SERVING)
    assert health(fleet.address, "") == SERVING  # degraded, not dead
    assert health(fleet.address, "inference.GRPCInferenceService") == SERVING
    np.testing.assert_allclose(infer(fleet.address), [4.0, 8.0])  # the last map still routes
    etcd.start()
    wait_for(lambda: health(fleet.address, "modelyard.store") == SERVING)
    np.testing.assert_allclose(infer(fleet.address), [4.0, 8.0])


def test_a_hung_store_turns_store_health_not_serving_and_calls_keep_answering(
    fleet: FleetThread, etcd: EtcdServer
) -> None:
    """etcd paused (SIGSTOP) sends no error, only silence: the router's probe must notice it anyway."""
    assert etcd.process is not None
    assert health(fleet.address, "modelyard.store") == SERVING
    os.kill(etcd.process.pid, signal.SIGSTOP)
    try:
        wait_for(lambda: health(fleet.address, "modelyard.store") == NOT_SERVING, timeout_s=30)
        assert health(fleet.address, "") == SERVING  # degraded, not dead
        np.testing.assert_allclose(infer(fleet.address), [4.0, 8.0])  # the last map still routes
    finally:
        os.kill(etcd.process.pid, signal.SIGCONT)
    wait_for(lambda: health(fleet.address, "modelyard.store") == SERVING, timeout_s=30)
    np.testing.assert_allclose(infer(fleet.address), [4.0, 8.0])


def test_reflection_lists_the_routers_services(fleet: FleetThread) -> None:
    with grpc.insecure_channel(fleet.address) as channel:
        services = set(ProtoReflectionDescriptorDatabase(channel).get_services())
    assert {"inference.GRPCInferenceService", "modelyard.v1.Router", "grpc.health.v1.Health"} <= services
