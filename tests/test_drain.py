"""SIGTERM drains: `modelyard serve` and our container refuse new calls but finish those in flight, then
exit 0."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from tritonclient.grpc import service_pb2 as pb

from modelyard.containers.triton.server import free_port
from modelyard.placement.model import ModelVersion
from tests.conftest import stop_process
from tests.fleet import FleetThread, start_custom_fleet
from tests.numpy_container.test_container import ContainerProcess, Repository, infer_request, linear_model

MiB = 1 << 20
ROWS, N = 2048, 4096  # 2048x4096 @ 4096x4096: ~2 s of math on one core, 32 MiB each way
INFER = "/inference.GRPCInferenceService/ModelInfer"
ONE_THREAD = {name: "1" for name in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS")}
BIG = (("grpc.max_receive_message_length", 64 * MiB), ("grpc.max_send_message_length", 64 * MiB))


def cpu_s(pid: int) -> float:
    """CPU seconds a process has used (user + system, from /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def slow_call_in_flight(
    address: str, container_pid: int, model: str, x: np.ndarray, pool: ThreadPoolExecutor
) -> Future[tuple[float, bytes]]:
    """Starts a slow call and returns once the container is computing it: (end time, response) later."""

    def call() -> tuple[float, bytes]:
        with grpc.insecure_channel(address, options=BIG) as channel:
            response = channel.unary_unary(INFER)(infer_request(model, x), timeout=60)
            return time.monotonic(), response

    before = cpu_s(container_pid)
    future = pool.submit(call)
    deadline = time.monotonic() + 30
    # The math has begun once the container has burnt 0.3 s of CPU (transfers take far less).
    while cpu_s(container_pid) - before < 0.3:
        assert not future.done(), future.exception() or "the call ended before it was seen running"
        assert time.monotonic() < deadline
        time.sleep(0.02)
    return future


def check_answer(response: bytes, x: np.ndarray, W: np.ndarray, b: np.ndarray) -> None:
    out = pb.ModelInferResponse.FromString(response).raw_output_contents[0]
    got = np.frombuffer(out, np.float32).reshape(ROWS, N)[:4]
    np.testing.assert_allclose(got, x[:4] @ W + b, rtol=1e-3, atol=1e-3)


@pytest.fixture
def slow_fleet(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[tuple[FleetThread, np.ndarray, np.ndarray]]:
    """One of our containers (math on one thread, so a call is slow) with a big `linear` model ready."""
    for name, value in ONE_THREAD.items():
        monkeypatch.setenv(name, value)  # inherited by the container process
    path, W, b = linear_model(tmp_path / "models" / "slow", n_in=N, n_out=N)
    model = ModelVersion(
        "slow", "1", backend="custom", memory_bytes=80 * MiB, artifact_uri=path.resolve().as_uri()
    )
    thread = start_custom_fleet(tmp_path / "fleet", [model])
    yield thread, W, b
    thread.stop()


def serve(fleet: FleetThread, *args: str) -> tuple[subprocess.Popen[bytes], str]:
    """`modelyard serve` in its own process, ready (its health SERVING) on a free port."""
    port = free_port()
    command = [
        sys.executable,
        "-m",
        "modelyard",
        "serve",
        "--port",
        str(port),
        "--store",
        fleet.fleet.store_url,
    ]
    command += ["--fleet-secret-file", str(fleet.fleet.fleet_secret_file), *args]
    process = subprocess.Popen(command, start_new_session=True)
    address = f"127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    with grpc.insecure_channel(address) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        while True:
            assert process.poll() is None and time.monotonic() < deadline
            try:
                status = health.Check(health_pb2.HealthCheckRequest(), timeout=1).status
                if status == health_pb2.HealthCheckResponse.SERVING:
                    return process, address
            except grpc.RpcError:
                pass  # not listening yet
            time.sleep(0.05)


def test_sigterm_to_the_router_lets_a_call_in_flight_finish_then_exits_0(
    slow_fleet: tuple[FleetThread, np.ndarray, np.ndarray],
) -> None:
    fleet, W, b = slow_fleet
    container = fleet.fleet.customs[0].process
    assert container is not None
    router, address = serve(fleet, "--drain-s", "20")
    x = np.random.default_rng(3).standard_normal((ROWS, N)).astype(np.float32)
    try:
        with ThreadPoolExecutor(1) as pool:
            call = slow_call_in_flight(address, container.pid, "slow", x, pool)
            signalled = time.monotonic()
            router.send_signal(signal.SIGTERM)
            ended, response = call.result(60)
        assert ended > signalled  # it was in flight when the router was told to stop
        check_answer(response, x, W, b)
        assert router.wait(10) == 0
        exited_s = time.monotonic() - ended  # an upper bound: when wait() returned
        assert exited_s < 5, "the router sat out its drain period with nothing in flight"
        print(f"call ended {ended - signalled:.2f} s after SIGTERM; router exited 0 within {exited_s:.2f} s")
    finally:
        if router.poll() is None:
            stop_process(router)  # type: ignore[arg-type]


@pytest.fixture
def container_process(tmp_path: Path) -> Iterator[ContainerProcess]:
    process = ContainerProcess(tmp_path, memory_bytes=80 * MiB, env=ONE_THREAD)
    process.start()
    yield process
    process.stop()


def test_sigterm_to_our_container_lets_a_call_in_flight_finish_then_exits_0(
    container_process: ContainerProcess, tmp_path: Path
) -> None:
    path, W, b = linear_model(tmp_path / "slow", n_in=N, n_out=N)
    repo = Repository(container_process.address)
    try:
        repo.load("slow", path)
    finally:
        repo.close()
    process = container_process.process
    assert process is not None
    x = np.random.default_rng(5).standard_normal((ROWS, N)).astype(np.float32)
    with ThreadPoolExecutor(1) as pool:
        call = slow_call_in_flight(container_process.address, process.pid, "slow", x, pool)
        signalled = time.monotonic()
        process.send_signal(signal.SIGTERM)
        ended, response = call.result(60)
    assert ended > signalled  # it was in flight when the container was told to stop
    check_answer(response, x, W, b)
    assert process.wait(10) == 0
    exited_s = time.monotonic() - ended
    assert exited_s < 5, "the container sat out its drain period with nothing in flight"
    print(f"call ended {ended - signalled:.2f} s after SIGTERM; container exited 0 within {exited_s:.2f} s")


def test_sigterm_to_the_router_lets_a_stream_in_flight_finish(
    slow_fleet: tuple[FleetThread, np.ndarray, np.ndarray],
) -> None:
    from modelyard.v1 import inference_pb2, router_pb2_grpc

    fleet, W, b = slow_fleet
    container = fleet.fleet.customs[0].process
    assert container is not None
    router, address = serve(fleet, "--drain-s", "20")
    x = np.random.default_rng(7).standard_normal((ROWS, N)).astype(np.float32)
    request = inference_pb2.InferRequest(model_name="slow", id="drained")
    request.inputs.add(name="INPUT", datatype="FP32", shape=list(x.shape))
    request.raw_input_contents.append(x.tobytes())

    def stream() -> tuple[float, list[bytes]]:
        with grpc.insecure_channel(address, options=BIG) as channel:
            responses = list(router_pb2_grpc.RouterStub(channel).InferStream(request, timeout=60))
            return time.monotonic(), [r.raw_output_contents[0] for r in responses if r.raw_output_contents]

    try:
        with ThreadPoolExecutor(1) as pool:
            before = cpu_s(container.pid)
            call = pool.submit(stream)
            deadline = time.monotonic() + 30
            while cpu_s(container.pid) - before < 0.3:  # the math has begun
                assert not call.done(), call.exception() or "the stream ended before it was seen running"
                assert time.monotonic() < deadline
                time.sleep(0.02)
            signalled = time.monotonic()
            router.send_signal(signal.SIGTERM)
            ended, outputs = call.result(60)
        assert ended > signalled
        (out,) = outputs
        got = np.frombuffer(out, np.float32).reshape(ROWS, N)[:4]
        np.testing.assert_allclose(got, x[:4] @ W + b, rtol=1e-3, atol=1e-3)
        assert router.wait(10) == 0
        print(f"stream ended {ended - signalled:.2f} s after SIGTERM; router exited 0")
    finally:
        if router.poll() is None:
            stop_process(router)  # type: ignore[arg-type]
