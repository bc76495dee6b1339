"""Streams cannot crash Triton, and every stream error ends with the status its cause deserves.

One Triton holds `stream` (decoupled) and `scale` (plain). A client stream that carries a request to each
used to be multiplexed onto one upstream stream, and Triton aborted (SIGABRT in proto_buffer_writer.h):
it writes decoupled and plain responses through two paths that break its one-write-at-a-time rule.
"""

from __future__ import annotations

import asyncio
import os
import queue
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from grpc_health.v1 import health_pb2, health_pb2_grpc

from modelyard.catalog.examples import install_example
from modelyard.containers.triton.server import free_port
from modelyard.local import LocalFleet
from modelyard.placement import registry
from modelyard.placement.model import Container, CopyState
from modelyard.placement.store import open_store
from modelyard.router.server import RouterServer
from modelyard.v1 import inference_pb2, router_pb2_grpc
from tests.conftest import require_triton
from tests.fleet import FleetThread

ROUNDS = 20


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FleetThread]:
    """triton-0 holds stream@1 and scale@1; `ghost` is a container registered ready where nothing listens."""
    require_triton()
    workdir = tmp_path_factory.mktemp("stream-safety")
    thread = FleetThread(workdir, str(workdir / "store"), containers=1)

    async def setup(fleet: LocalFleet) -> None:
        await fleet.start_store_and_models(examples=False)
        models = [install_example(name, workdir / "artifacts") for name in ("stream", "scale")]
        ghostly = install_example("identity", workdir / "artifacts")
        for model in (*models, ghostly):
            await registry.register_model(fleet.store, model)
        await fleet.start_containers()
        # A real fault: a container the map believes ready, whose address refuses connections.
        ghost = Container("ghost", f"127.0.0.1:{free_port()}", kind="cpu", memory_bytes=2**30)
        await registry.register_container(fleet.store, ghost)
        # scale@1 has a second copy on the ghost: calls that pick it must go to triton-0's copy instead.
        plan = {m.key: ["triton-0"] for m in models} | {
            ghostly.key: ["ghost"],
            "scale@1": ["triton-0", "ghost"],
        }
        await registry.write_shard_map(fleet.store, plan, expected_generation=0)
        await registry.put_copy_state(fleet.store, "ghost", ghostly.key, CopyState("ready"))
        await registry.put_copy_state(fleet.store, "ghost", "scale@1", CopyState("ready"))
        await fleet.start_router()
        await fleet.wait_ready(models, timeout_s=120)

    try:
        thread.start(setup)
        yield thread
    finally:
        thread.stop()


def triton_pid_alive(fleet: FleetThread, pid: int) -> bool:
    process = fleet.fleet.tritons[0].process
    if process is None or process.pid != pid or process.poll() is not None:
        return False
    os.kill(pid, 0)  # raises if no such process
    return True


def fp32(values: list[float]) -> grpcclient.InferInput:
    tensor = grpcclient.InferInput("INPUT", [len(values)], "FP32")
    tensor.set_data_from_numpy(np.array(values, dtype=np.float32))
    return tensor


def request(model: str, values: list[float], request_id: str = "") -> inference_pb2.InferRequest:
    req = inference_pb2.InferRequest(model_name=model, id=request_id)
    req.inputs.add(name="INPUT", datatype="FP32", shape=[len(values)])
    req.raw_input_contents.append(np.array(values, dtype=np.float32).tobytes())
    return req


def floats(response: inference_pb2.InferResponse) -> list[float]:
    raw = response.raw_output_contents
    return np.frombuffer(raw[0], dtype=np.float32).tolist() if raw else []


# -- part 2: mixed decoupled and plain requests on one client stream ------------------------------------


def test_mixed_kserve_stream_20_times_answers_right_and_triton_survives(fleet: FleetThread) -> None:
    process = fleet.fleet.tritons[0].process
    assert process is not None
    pid = process.pid
    with grpcclient.InferenceServerClient(fleet.address) as client:
        for round_ in range(ROUNDS):
            results: queue.Queue = queue.Queue()  # type: ignore[type-arg]
            client.start_stream(callback=lambda result, error, into=results: into.put((result, error)))
            try:
                client.async_stream_infer(
                    "stream",
                    [fp32([1.0, 2.0, 3.0])],
                    request_id=f"s{round_}",
                    enable_empty_final_response=True,
                )
                client.async_stream_infer("scale", [fp32([4.0, 5.0])], request_id=f"p{round_}")
                got = [results.get(timeout=30) for _ in range(3 + 1 + 1)]
            finally:
                client.stop_stream()
            assert [error for _, error in got if error is not None] == []
            by_id: dict[str, list[list[float]]] = {}
            for result, _ in got:
                response = result.get_response()
                if response.outputs:
                    by_id.setdefault(response.id, []).append(result.as_numpy("OUTPUT").tolist())
            assert by_id == {f"s{round_}": [[1.0], [2.0], [3.0]], f"p{round_}": [[8.0, 10.0]]}
    assert triton_pid_alive(fleet, pid)


def test_mixed_infer_session_20_times_answers_right_and_triton_survives(fleet: FleetThread) -> None:
    process = fleet.fleet.tritons[0].process
    assert process is not None
    pid = process.pid
    with grpc.insecure_channel(fleet.address) as channel:
        stub = router_pb2_grpc.RouterStub(channel)
        for round_ in range(ROUNDS):
            decoupled = request("stream", [1.0, 2.0, 3.0], f"s{round_}")
            decoupled.parameters["triton_enable_empty_final_response"].bool_param = True
            requests = [decoupled, request("scale", [4.0, 5.0], f"p{round_}")]
            # The session ends when the client half-closes and both upstream streams have finished.
            answers = list(stub.InferSession(iter(requests), timeout=30))
            assert [a.error_message for a in answers] == [""] * len(answers)
            by_id: dict[str, list[list[float]]] = {}
            for answer in answers:
                response = answer.infer_response
                if response.raw_output_contents:
                    by_id.setdefault(response.id, []).append(floats(response))
            assert by_id == {f"s{round_}": [[1.0], [2.0], [3.0]], f"p{round_}": [[8.0, 10.0]]}
    assert triton_pid_alive(fleet, pid)


def test_a_client_that_cancels_a_stream_cancels_the_upstream_stream(fleet: FleetThread) -> None:
    router = fleet.fleet.router
    assert router is not None
    outstanding = router.router.channels.outstanding
    with grpc.insecure_channel(fleet.address) as channel:
        stub = router_pb2_grpc.RouterStub(channel)
        # Many responses: the stream is still running when the client cancels after the first one.
        call = stub.InferStream(request("stream", [float(i) for i in range(200_000)]), timeout=60)
        assert floats(next(call)) == [0.0]
        assert outstanding.get("triton-0", 0) >= 1
        call.cancel()

    deadline = time.monotonic() + 10
    while outstanding.get("triton-0", 0):  # the router closes its upstream stream
        assert time.monotonic() < deadline, "the upstream stream outlived the client's"
        time.sleep(0.01)
    with grpcclient.InferenceServerClient(fleet.address) as client:  # and Triton still serves
        assert client.infer("scale", [fp32([1.0])]).as_numpy("OUTPUT").tolist() == [2.0]


# -- part 3: every stream error's status ----------------------------------------------------------------


def infer_stream_status(address: str, req: inference_pb2.InferRequest | bytes) -> tuple[grpc.StatusCode, str]:
    with grpc.insecure_channel(address) as channel:
        if isinstance(req, bytes):
            call = channel.unary_stream("/modelyard.v1.Router/InferStream")(req, timeout=30)
        else:
            call = router_pb2_grpc.RouterStub(channel).InferStream(req, timeout=30)
        with pytest.raises(grpc.RpcError) as caught:
            list(call)
    return caught.value.code(), caught.value.details() or ""


def test_infer_stream_for_an_unknown_model_is_not_found(fleet: FleetThread) -> None:
    code, details = infer_stream_status(fleet.address, request("no_such_model", [1.0]))
    assert code == grpc.StatusCode.NOT_FOUND and "no_such_model" in details


def test_infer_stream_for_an_unknown_version_is_not_found(fleet: FleetThread) -> None:
    req = request("stream", [1.0])
    req.model_version = "7"
    code, details = infer_stream_status(fleet.address, req)
    assert code == grpc.StatusCode.NOT_FOUND and "'7'" in details


def test_infer_stream_with_malformed_bytes_is_invalid_argument(fleet: FleetThread) -> None:
    code, details = infer_stream_status(fleet.address, b"\x0a\xff\xff\xff")
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "malformed" in details


def test_infer_stream_with_a_wrong_input_triton_rejects_is_invalid_argument(fleet: FleetThread) -> None:
    req = request("stream", [1.0])
    req.inputs[0].name = "NOT_AN_INPUT"  # Triton answers in the stream, with no status code
    code, details = infer_stream_status(fleet.address, req)
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "NOT_AN_INPUT" in details


def test_infer_stream_to_a_container_that_stays_down_waits_for_a_copy_until_its_deadline(
    fleet: FleetThread,
) -> None:
    """The only copy's container refuses the stream before any response: the request did not run, so the
    router waits for a copy it can reach within the deadline (router/stream.py fail_over), as a unary call
    does. None comes: the deadline ends it, not an UNAVAILABLE at once."""
    started = time.monotonic()
    with grpc.insecure_channel(fleet.address) as channel:
        call = router_pb2_grpc.RouterStub(channel).InferStream(request("identity", [1.0]), timeout=3)
        with pytest.raises(grpc.RpcError) as caught:
            list(call)
    assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert 2.5 < time.monotonic() - started < 10


def test_infer_session_to_a_container_that_stays_down_waits_until_its_deadline(fleet: FleetThread) -> None:
    started = time.monotonic()
    with grpc.insecure_channel(fleet.address) as channel:
        call = router_pb2_grpc.RouterStub(channel).InferSession(iter([request("identity", [1.0])]), timeout=3)
        with pytest.raises(grpc.RpcError) as caught:
            list(call)
    assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert 2.5 < time.monotonic() - started < 10


def test_streams_whose_copy_refuses_them_fail_over_to_the_other_copy(fleet: FleetThread) -> None:
    """scale@1 is listed ready on triton-0 and on `ghost` (nothing listens there). Until the ghost has
    refused a call the copy choice is random between the two, so streams reach it; every one must still
    answer right, through the other copy, and the router must count those it moved. Once refused, the ghost
    is no longer chosen while triton-0 is usable (router/forward.py `usable`), so the stream that met it
    may have come in an earlier test of this module: the count is of the module's fleet."""
    router = fleet.fleet.router
    assert router is not None
    pool = router.router.streams
    with grpc.insecure_channel(fleet.address) as channel:
        stub = router_pb2_grpc.RouterStub(channel)
        for i in range(30):
            responses = list(stub.InferStream(request("scale", [float(i)]), timeout=30))
            assert [floats(r) for r in responses if r.outputs] == [[2.0 * i]]
        session = list(
            stub.InferSession(iter([request("scale", [float(i)], f"r{i}") for i in range(30)]), timeout=30)
        )
    assert [a.error_message for a in session] == [""] * len(session)
    answers = {a.infer_response.id: floats(a.infer_response) for a in session if a.infer_response.outputs}
    assert answers == {f"r{i}": [2.0 * i] for i in range(30)}
    assert pool.failed_over >= 1


def test_unary_infer_to_a_container_that_stays_down_waits_for_a_copy_until_its_deadline(
    fleet: FleetThread,
) -> None:
    """UNAVAILABLE from the only copy means the request never ran: the router waits within the call's
    deadline for a copy it can reach (router/routing.py forward_unary). None comes: the deadline ends it."""
    started = time.monotonic()
    with grpc.insecure_channel(fleet.address) as channel:
        with pytest.raises(grpc.RpcError) as caught:
            router_pb2_grpc.RouterStub(channel).Infer(request("identity", [1.0]), timeout=3)
    assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert 2.5 < time.monotonic() - started < 10  # waited for the copy, and not past the deadline


@pytest.fixture
def short_deadline_router(fleet: FleetThread) -> Iterator[str]:
    """A second router on the fleet's store whose default upstream deadline is 0.3 s."""

    async def start() -> RouterServer:
        server = RouterServer(
            fleet.fleet.store, port=0, default_deadline_s=0.3, fleet_secret=fleet.fleet.fleet_secret
        )
        await server.start()
        await server.router.follower.first_load.wait()
        return server

    server = fleet.call(start())
    try:
        yield server.address
    finally:
        fleet.call(server.stop())


def test_a_stream_past_the_default_deadline_is_deadline_exceeded(short_deadline_router: str) -> None:
    # The caller sets no deadline; 200k responses take far longer than the router's default of 0.3 s.
    with grpc.insecure_channel(short_deadline_router) as channel:
        call = router_pb2_grpc.RouterStub(channel).InferStream(request("stream", [1.0] * 200_000))
        with pytest.raises(grpc.RpcError) as caught:
            for _ in call:
                pass
    assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED


def test_a_unary_call_to_a_silent_container_past_the_default_deadline_is_deadline_exceeded(
    fleet: FleetThread, short_deadline_router: str
) -> None:
    # The caller sets no deadline and Triton stops answering without closing anything (SIGSTOP: the kernel
    # still holds its connections), so only the router's default deadline (0.3 s, kept by its sweep, not
    # by a gRPC deadline) can end the call.
    process = fleet.fleet.tritons[0].process
    assert process is not None
    with grpc.insecure_channel(short_deadline_router) as channel:
        stub = router_pb2_grpc.RouterStub(channel)
        assert floats(stub.Infer(request("scale", [1.5]))) == [3.0]  # connected, the copy ready
        os.kill(process.pid, signal.SIGSTOP)
        try:
            started = time.monotonic()
            with pytest.raises(grpc.RpcError) as caught:
                stub.Infer(request("scale", [1.5]))
            took_s = time.monotonic() - started
        finally:
            os.kill(process.pid, signal.SIGCONT)
    assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED, caught.value.details()
    assert "default deadline of 0.3 s" in (caught.value.details() or "")
    assert 0.3 <= took_s < 2.0  # the deadline, plus at most one sweep period and the call's own time


def test_a_unary_call_within_the_default_deadline_succeeds(short_deadline_router: str) -> None:
    with grpc.insecure_channel(short_deadline_router) as channel:
        response = router_pb2_grpc.RouterStub(channel).Infer(request("scale", [1.5]))
    assert floats(response) == [3.0]


def test_before_its_table_loads_the_router_is_unavailable_and_not_serving(tmp_path: Path) -> None:
    async def run() -> None:
        # An etcd where nothing listens: the routing table never loads.
        store = open_store(f"etcd://127.0.0.1:{free_port()}")
        server = RouterServer(store, port=0)
        await server.start()
        try:
            async with grpc.aio.insecure_channel(server.address) as channel:
                stub = router_pb2_grpc.RouterStub(channel)
                with pytest.raises(grpc.aio.AioRpcError) as unary:
                    await stub.Infer(request("scale", [1.0]), timeout=10)
                with pytest.raises(grpc.aio.AioRpcError) as streamed:
                    async for _ in stub.InferStream(request("stream", [1.0]), timeout=10):
                        pass
                session = stub.InferSession(timeout=10)
                await session.write(request("scale", [1.0]))
                await session.done_writing()
                answers = [a async for a in session]
                health = await health_pb2_grpc.HealthStub(channel).Check(
                    health_pb2.HealthCheckRequest(service=""), timeout=10
                )
            for caught in (unary, streamed):
                assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
                assert "routing table not loaded yet" in (caught.value.details() or "")
            assert [a.error_message for a in answers] == ["routing table not loaded yet"]
            assert health.status == health_pb2.HealthCheckResponse.NOT_SERVING
        finally:
            await server.stop()
            await store.close()

    asyncio.run(run())
