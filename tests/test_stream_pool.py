"""Pooled upstream streams: client streams share long-lived `ModelStreamInfer` streams to the container, told
apart by request id, and never share one across model versions (decoupled `stream` and plain `scale`)."""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Iterator

import grpc
import grpc.aio
import numpy as np
import pytest

from modelyard.catalog.examples import install_example
from modelyard.local import LocalFleet
from modelyard.placement import registry
from modelyard.placement.model import ModelVersion
from modelyard.router.server import RouterServer
from modelyard.router.stream import Upstream
from modelyard.v1 import inference_pb2, router_pb2, router_pb2_grpc
from tests.conftest import require_triton
from tests.fleet import FleetThread

MODELS: dict[str, ModelVersion] = {}


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FleetThread]:
    require_triton()
    workdir = tmp_path_factory.mktemp("stream-pool")
    thread = FleetThread(workdir, str(workdir / "store"), containers=1)

    async def setup(fleet: LocalFleet) -> None:
        await fleet.start_store_and_models(examples=False)
        models = [install_example(name, workdir / "artifacts") for name in ("stream", "scale")]
        for model in models:
            await registry.register_model(fleet.store, model)
            MODELS[model.name] = model
        await fleet.start_containers()
        await registry.write_shard_map(
            fleet.store, {m.key: ["triton-0"] for m in models}, expected_generation=0
        )
        await fleet.start_router()
        await fleet.wait_ready(models, timeout_s=120)

    try:
        thread.start(setup)
        yield thread
    finally:
        thread.stop()


def request(
    model: str, values: list[float], request_id: str = "", *, final: bool = False
) -> inference_pb2.InferRequest:
    req = inference_pb2.InferRequest(model_name=model, id=request_id)
    req.inputs.add(name="INPUT", datatype="FP32", shape=[len(values)])
    req.raw_input_contents.append(np.array(values, dtype=np.float32).tobytes())
    if final:
        req.parameters["triton_enable_empty_final_response"].bool_param = True
    return req


def floats(response: inference_pb2.InferResponse) -> list[float]:
    raw = response.raw_output_contents
    return np.frombuffer(raw[0], dtype=np.float32).tolist() if raw else []


class Session:
    """An InferSession kept open: requests go in one by one, answers come out in order."""

    def __init__(self, channel: grpc.Channel) -> None:
        self.requests: queue.Queue[inference_pb2.InferRequest | None] = queue.Queue()
        self.call = router_pb2_grpc.RouterStub(channel).InferSession(
            iter(self.requests.get, None), timeout=60
        )

    def send(self, req: inference_pb2.InferRequest) -> None:
        self.requests.put(req)

    def next(self) -> router_pb2.StreamResponse:
        answer: router_pb2.StreamResponse = next(self.call)
        return answer

    def close(self) -> None:
        self.requests.put(None)


def upstreams(fleet: FleetThread, model: str) -> list[Upstream]:
    """The router's pooled upstream streams for `model` on triton-0 (read on the fleet's loop)."""
    router = fleet.fleet.router
    assert router is not None

    async def read() -> list[Upstream]:
        return list(router.router.streams.upstreams.get(("triton-0", MODELS[model].key), []))

    return fleet.call(read())


def test_two_client_streams_share_one_upstream_stream_and_get_their_own_ids(fleet: FleetThread) -> None:
    with grpc.insecure_channel(fleet.address) as channel:
        first, second = Session(channel), Session(channel)
        try:
            first.send(request("scale", [1.0], "same-id"))
            answer = first.next()
            assert (answer.infer_response.id, floats(answer.infer_response)) == ("same-id", [2.0])
            [shared] = upstreams(fleet, "scale")
            second.send(request("scale", [5.0], "same-id"))
            answer = second.next()
            assert (answer.infer_response.id, floats(answer.infer_response)) == ("same-id", [10.0])
            assert answer.infer_response.model_name == "scale"  # the public name, not Triton's own
            assert upstreams(fleet, "scale") == [shared]  # the second caller used the open stream
            assert not shared.call.done()
        finally:
            first.close()
            second.close()


def test_infer_stream_calls_reuse_the_open_upstream_stream(fleet: FleetThread) -> None:
    with grpc.insecure_channel(fleet.address) as channel:
        stub = router_pb2_grpc.RouterStub(channel)
        answers = list(stub.InferStream(request("stream", [1.0, 2.0], "mine"), timeout=30))
        [opened] = upstreams(fleet, "stream")
        again = list(stub.InferStream(request("stream", [3.0], "other"), timeout=30))
        assert upstreams(fleet, "stream") == [opened]
    assert [floats(a) for a in answers] == [[1.0], [2.0], []]  # the empty final response ends it
    assert {a.id for a in answers} == {"mine"} and {a.id for a in again} == {"other"}
    assert answers[-1].parameters["triton_final_response"].bool_param


def test_a_session_that_did_not_ask_for_the_empty_final_response_does_not_get_it(fleet: FleetThread) -> None:
    with grpc.insecure_channel(fleet.address) as channel:
        answers = list(
            router_pb2_grpc.RouterStub(channel).InferSession(
                iter([request("stream", [1.0, 2.0], "r")]), timeout=30
            )
        )
    assert [floats(a.infer_response) for a in answers] == [[1.0], [2.0]]


def test_mixed_models_on_one_client_stream_use_separate_upstream_streams(fleet: FleetThread) -> None:
    with grpc.insecure_channel(fleet.address) as channel:
        session = Session(channel)
        try:
            session.send(request("stream", [1.0], "s", final=True))
            session.send(request("scale", [1.0], "p"))
            ids = [session.next().infer_response.id for _ in range(3)]
            assert sorted(ids) == ["p", "s", "s"]
            decoupled, plain = upstreams(fleet, "stream"), upstreams(fleet, "scale")
            assert decoupled and plain
            # Each pooled stream carries one model version only: the two never meet on one stream.
            assert {id(u.call) for u in decoupled}.isdisjoint({id(u.call) for u in plain})
            assert {u.model.key for u in decoupled} == {MODELS["stream"].key}
            assert {u.model.key for u in plain} == {MODELS["scale"].key}
        finally:
            session.close()


def wait_for(condition: Callable[[], bool], what: str, timeout_s: float = 30) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, what
        time.sleep(0.01)


def test_cancelling_one_client_stream_leaves_the_others_requests_running(fleet: FleetThread) -> None:
    router = fleet.fleet.router
    assert router is not None
    outstanding = router.router.channels.outstanding
    values = [float(i) for i in range(3000)]
    got: list[float] = []
    with grpc.insecure_channel(fleet.address) as channel:
        stub = router_pb2_grpc.RouterStub(channel)
        leaving = stub.InferStream(request("stream", [1.0] * 20_000, "leaving"), timeout=60)
        assert floats(next(leaving)) == [1.0]
        [shared] = upstreams(fleet, "stream")
        staying = stub.InferStream(request("stream", values, "staying"), timeout=60)
        reader = threading.Thread(target=lambda: got.extend(v for a in staying for v in floats(a)))
        reader.start()
        wait_for(lambda: shared.live == 2, "the second request did not ride the open upstream stream")
        leaving.cancel()
        reader.join(60)
    assert got == values  # every response of the other caller's request arrived
    assert shared.retiring  # the stream that carried an abandoned request takes no new ones
    wait_for(lambda: not outstanding.get("triton-0", 0) and shared.call.done(), "upstream outlived callers")
    assert shared not in upstreams(fleet, "stream")  # closed and gone from the pool


def test_a_caller_that_stops_reading_does_not_hold_up_another_on_the_same_stream(fleet: FleetThread) -> None:
    with grpc.insecure_channel(fleet.address) as channel:
        stub = router_pb2_grpc.RouterStub(channel)
        slow = stub.InferStream(request("stream", [1.0] * 5_000, "slow"), timeout=120)
        assert floats(next(slow)) == [1.0]  # then it reads nothing more
        [shared] = upstreams(fleet, "stream")
        other = stub.InferStream(request("stream", [7.0, 8.0], "other"), timeout=120)
        # Triton runs the two one after the other (one model instance); the router must not make the
        # second wait for the first caller to read.
        assert [floats(a) for a in other] == [[7.0], [8.0], []]
        assert upstreams(fleet, "stream") == [shared]  # it went on the same stream
        slow.cancel()


def test_a_stopped_router_leaves_no_upstream_stream_or_channel_open(fleet: FleetThread) -> None:
    local = fleet.fleet

    async def run() -> None:
        # A second router on the fleet's follower: its table is current at once, and stopping it leaves
        # the fleet's own router serving the other tests.
        server = RouterServer(
            local.store, "127.0.0.1", 0, fleet_secret=local.fleet_secret, follower=local.follower
        )
        await server.start()
        router = server.router
        try:
            async with grpc.aio.insecure_channel(server.address) as channel:
                session = router_pb2_grpc.RouterStub(channel).InferSession(timeout=60)
                await session.write(request("scale", [1.0], "r1"))
                answer = await session.read()
                assert floats(answer.infer_response) == [2.0]
                await session.done_writing()
                assert await session.read() == grpc.aio.EOF
            # The client stream is over; the pooled upstream stream stays open for the next caller.
            upstreams = [u for streams in router.streams.upstreams.values() for u in streams]
            channels = list(router.channels._channels.values())
            assert upstreams and not any(u.call.done() for u in upstreams) and channels
        finally:
            await server.stop()
        assert router.streams.upstreams == {}
        assert all(u.call.done() and u.reader.done() for u in upstreams)
        assert all(c.get_state() == grpc.ChannelConnectivity.SHUTDOWN for c in channels)

    fleet.call(run())
