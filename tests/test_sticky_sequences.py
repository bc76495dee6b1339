"""Sticky sequences (router/sequences.py): the calls of one Triton sequence reach one copy whichever router
takes them, and a sequence whose copy dies fails with ABORTED naming it, never restarting elsewhere.

The integration test runs the stateful example `accumulate` (sequence batcher, python backend running sum)
on two real Tritons behind two independent routers (each with its own store follower), one called over
gRPC and the other over REST."""

from __future__ import annotations

import queue
import time
from collections.abc import Iterator

import grpc
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from hypothesis import given
from hypothesis import strategies as st
from tritonclient.grpc import service_pb2 as kserve
from tritonclient.utils import InferenceServerException

from modelyard.catalog.examples import install_example
from modelyard.containers.triton.adapter import triton_model_name
from modelyard.fleet_secret import FLEET_SECRET_HEADER
from modelyard.local import LocalFleet
from modelyard.placement import registry
from modelyard.placement.model import Container, ModelVersion
from modelyard.router.routing import Router
from modelyard.router.sequences import SequenceCall, lost_sequence, read_sequence, sticky_copy
from modelyard.router.server import RouterServer
from tests.conftest import require_triton
from tests.fleet import FleetThread

KEY = "accumulate@1"
CALL_TIMEOUT_S = 30.0  # a call that hangs fails the test instead


def copies(*ids: str) -> list[Container]:
    return [Container(i, f"127.0.0.1:{n + 1}") for n, i in enumerate(ids)]


def infer_bytes(**sequence: object) -> bytes:
    """A ModelInferRequest as tritonclient.grpc serializes it, with the sequence arguments given."""
    from tritonclient.grpc._utils import _get_inference_request

    tensor = grpcclient.InferInput("INPUT", [1, 1], "FP32")
    tensor.set_data_from_numpy(np.array([[1.0]], dtype=np.float32))
    arguments = {"sequence_id": 0, "sequence_start": False, "sequence_end": False} | sequence
    request = _get_inference_request(
        model_name="accumulate", inputs=[tensor], model_version="", request_id="", outputs=None,
        priority=0, timeout=None, parameters=None, **arguments,
    )  # fmt: skip
    return bytes(request.SerializeToString())


def test_the_sequence_id_and_start_flag_are_read_from_the_request_parameters() -> None:
    assert read_sequence(infer_bytes(sequence_id=42, sequence_start=True)) == SequenceCall("42", True)
    assert read_sequence(infer_bytes(sequence_id="user-7")) == SequenceCall("user-7", False)
    assert read_sequence(infer_bytes()) is None  # no sequence
    assert read_sequence(b"\xff\xff") is None  # malformed: no sequence (the container refuses the bytes)


def test_every_router_picks_the_same_copy_and_a_removed_copy_moves_only_its_sequences() -> None:
    fleet = copies("triton-0", "triton-1", "triton-2", "triton-3")
    ids = [str(i) for i in range(2000)]
    chosen = {i: sticky_copy(i, fleet) for i in ids}
    assert chosen == {i: sticky_copy(i, list(reversed(fleet))) for i in ids}  # order does not matter
    counts = {c.id: sum(1 for v in chosen.values() if v is c) for c in fleet}
    assert all(400 < n < 600 for n in counts.values()), counts  # spread evenly
    survivors = [c for c in fleet if c.id != "triton-2"]
    for i in ids:
        after = sticky_copy(i, survivors)
        if chosen[i] is not None and chosen[i].id != "triton-2":  # type: ignore[union-attr]
            assert after is chosen[i]  # only the lost copy's sequences move


def test_only_failures_that_lose_a_sequence_become_aborted() -> None:
    model = ModelVersion(name="accumulate", version="1")
    going_on, starting = SequenceCall("9", False), SequenceCall("9", True)
    unavailable = lost_sequence(
        going_on, model, "triton-1", grpc.StatusCode.UNAVAILABLE, "connection refused"
    )
    assert unavailable is not None and unavailable.code == grpc.StatusCode.ABORTED
    assert str(unavailable).startswith("sequence 9 of model 'accumulate' version '1' is lost: its copy on")
    assert lost_sequence(starting, model, "triton-1", grpc.StatusCode.UNAVAILABLE, "refused") is None
    refused = (
        "inference request for sequence 9 to model 'accumulate@1' must specify the START flag on the first"
    )
    assert lost_sequence(going_on, model, "triton-0", grpc.StatusCode.INVALID_ARGUMENT, refused) is not None
    assert lost_sequence(going_on, model, "triton-0", grpc.StatusCode.INVALID_ARGUMENT, "bad shape") is None


class TwoRouters(FleetThread):
    other: RouterServer


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TwoRouters]:
    require_triton()
    workdir = tmp_path_factory.mktemp("sequences")
    thread = TwoRouters(workdir, str(workdir / "store"), containers=2)
    thread.fleet.http_port = 0

    async def setup(fleet: LocalFleet) -> None:
        await fleet.start_store_and_models(examples=False)
        model = install_example("accumulate", fleet.artifacts_dir, replicas=2)
        await registry.register_model(fleet.store, model)
        await fleet.start_containers()
        await registry.write_shard_map(fleet.store, {KEY: ["triton-0", "triton-1"]}, expected_generation=0)
        await fleet.start_router()
        # Another router, following the store on its own: nothing shared with the first but the store.
        thread.other = RouterServer(fleet.store, port=0, fleet_secret=fleet.fleet_secret, http_port=0)
        await thread.other.start()
        await fleet.wait_ready([model], timeout_s=120)

    try:
        thread.start(setup)
        yield thread
    finally:
        if getattr(thread, "other", None) is not None:
            thread.call(thread.other.stop(0))
        thread.stop()


def routers(fleet: TwoRouters) -> tuple[Router, Router]:
    assert fleet.fleet.router is not None
    return fleet.fleet.router.router, fleet.other.router


def by_grpc(fleet: TwoRouters, sequence: int, value: float, start: bool = False) -> float:
    tensor = grpcclient.InferInput("INPUT", [1, 1], "FP32")  # accumulate batches: [batch, values]
    tensor.set_data_from_numpy(np.array([[value]], dtype=np.float32))
    with grpcclient.InferenceServerClient(fleet.address) as client:
        result = client.infer(
            "accumulate", [tensor], sequence_id=sequence, sequence_start=start, client_timeout=CALL_TIMEOUT_S
        )
    return float(result.as_numpy("OUTPUT")[0][0])


def by_rest(fleet: TwoRouters, sequence: int, value: float, start: bool = False) -> float:
    assert fleet.other.rest_address is not None
    tensor = httpclient.InferInput("INPUT", [1, 1], "FP32")
    tensor.set_data_from_numpy(np.array([[value]], dtype=np.float32))
    with httpclient.InferenceServerClient(
        fleet.other.rest_address, connection_timeout=CALL_TIMEOUT_S, network_timeout=CALL_TIMEOUT_S
    ) as client:
        result = client.infer("accumulate", [tensor], sequence_id=sequence, sequence_start=start)
    return float(result.as_numpy("OUTPUT")[0][0])


def inference_count(fleet: TwoRouters, index: int) -> int:
    with grpcclient.InferenceServerClient(fleet.fleet.tritons[index].address) as direct:
        stats = direct.get_inference_statistics(
            triton_model_name("accumulate", "1"), headers={FLEET_SECRET_HEADER: fleet.fleet.fleet_secret}
        ).model_stats
    return sum(s.inference_count for s in stats)


def wait_until(condition: object, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():  # type: ignore[operator]
        assert time.monotonic() < deadline, f"not within {timeout_s} s: {what}"
        time.sleep(0.05)


def streamed_error(fleet: TwoRouters, sequence: int, value: float) -> str:
    """One ModelStreamInfer call of `sequence` through the first router: the in-stream error it gets."""
    answers: queue.Queue[tuple[object, object]] = queue.Queue()
    with grpcclient.InferenceServerClient(fleet.address) as client:
        client.start_stream(callback=lambda result, error: answers.put((result, error)))
        tensor = grpcclient.InferInput("INPUT", [1, 1], "FP32")
        tensor.set_data_from_numpy(np.array([[value]], dtype=np.float32))
        client.async_stream_infer("accumulate", [tensor], request_id=f"{sequence}-s", sequence_id=sequence)
        result, error = answers.get(timeout=CALL_TIMEOUT_S)
        client.stop_stream()
    assert error is not None, f"sequence {sequence}'s streamed call was answered: {result}"
    return str(error)


def test_streamed_calls_of_a_sequence_stay_on_its_copy(fleet: TwoRouters) -> None:
    first, _ = routers(fleet)
    ready = first.table.ready_copies(KEY)
    sequences = list(range(201, 209))
    home = {s: sticky_copy(str(s), ready).id for s in sequences}  # type: ignore[union-attr]
    before = [inference_count(fleet, 0), inference_count(fleet, 1)]
    answers: queue.Queue[tuple[object, object]] = queue.Queue()
    with grpcclient.InferenceServerClient(fleet.address) as client:
        client.start_stream(callback=lambda result, error: answers.put((result, error)))
        for step in range(1, 5):
            for s in sequences:
                tensor = grpcclient.InferInput("INPUT", [1, 1], "FP32")
                tensor.set_data_from_numpy(np.array([[float(step)]], dtype=np.float32))
                client.async_stream_infer(
                    "accumulate", [tensor], request_id=f"{s}-{step}", sequence_id=s, sequence_start=step == 1
                )
            for _ in sequences:  # this step's answers before the next step's calls
                result, error = answers.get(timeout=CALL_TIMEOUT_S)
                assert error is None, error
                s = int(result.get_response().id.split("-")[0])  # type: ignore[attr-defined]
                assert result.as_numpy("OUTPUT")[0][0] == sum(range(1, step + 1)), (s, step)  # type: ignore[attr-defined]
        client.stop_stream()
    per_copy = [4 * sum(1 for h in home.values() if h == cid) for cid in ("triton-0", "triton-1")]
    wait_until(
        lambda: [inference_count(fleet, i) - before[i] for i in (0, 1)] == per_copy,
        10,
        f"each Triton ran exactly its own sequences' streamed calls {per_copy}",
    )


def test_a_sequence_stays_on_one_copy_through_two_routers_and_dies_with_it(fleet: TwoRouters) -> None:
    first, second = routers(fleet)
    ready = first.table.ready_copies(KEY)
    assert sorted(c.id for c in ready) == ["triton-0", "triton-1"]
    sequences = list(range(101, 113))
    home = {s: sticky_copy(str(s), ready).id for s in sequences}  # type: ignore[union-attr]
    assert set(home.values()) == {"triton-0", "triton-1"}  # both copies hold some sequences
    before = [inference_count(fleet, 0), inference_count(fleet, 1)]

    # Each sequence: started through one router, then alternating routers (gRPC, REST) call by call. A
    # call that reached the other copy would be refused there (no START) or restart the sum.
    for s in sequences:
        assert by_grpc(fleet, s, 1.0, start=True) == 1.0
    for step in range(2, 6):
        for s in sequences:
            call = by_rest if step % 2 == 0 else by_grpc
            assert call(fleet, s, float(step)) == sum(range(1, step + 1)), (s, step)
    per_copy = {cid: 5 * sum(1 for h in home.values() if h == cid) for cid in ("triton-0", "triton-1")}
    wait_until(
        lambda: (
            [inference_count(fleet, i) - before[i] for i in (0, 1)]
            == [per_copy["triton-0"], per_copy["triton-1"]]
        ),
        10,
        f"each Triton ran exactly its own sequences' calls {per_copy}",
    )

    # The copy holding `lost` dies mid-sequence; `kept` lives on the other copy.
    lost = next(s for s in sequences if home[s] == "triton-1")
    kept = next(s for s in sequences if home[s] == "triton-0")
    fleet.fleet.tritons[1].stop()
    with pytest.raises(InferenceServerException) as at_once:
        by_grpc(fleet, lost, 6.0)
    assert at_once.value.status() == "StatusCode.ABORTED"
    assert f"sequence {lost} of model 'accumulate' version '1' is lost" in at_once.value.message()
    # A streamed call of it fails the same way: the pooled stream's failover never resends it elsewhere.
    assert f"sequence {lost} of model 'accumulate' version '1' is lost" in streamed_error(fleet, lost, 6.0)
    wait_until(
        lambda: all([c.id for c in r.table.ready_copies(KEY)] == ["triton-0"] for r in (first, second)),
        30,
        "both routers see only triton-0 ready",
    )
    # Now the sequence maps to the surviving copy, which does not hold it: still lost, on both routers.
    with pytest.raises(InferenceServerException) as by_first:
        by_grpc(fleet, lost, 6.0)
    assert by_first.value.status() == "StatusCode.ABORTED" and f"sequence {lost} " in by_first.value.message()
    with pytest.raises(InferenceServerException) as by_second:
        by_rest(fleet, lost, 6.0)
    assert by_second.value.status() == "409" and f"sequence {lost} " in by_second.value.message()
    # The other copy's sequence goes on as if nothing happened, and the lost one starts again.
    assert by_grpc(fleet, kept, 6.0) == sum(range(1, 7))
    assert by_rest(fleet, kept, 7.0) == sum(range(1, 8))
    assert by_rest(fleet, lost, 10.0, start=True) == 10.0
    assert by_grpc(fleet, lost, 1.0) == 11.0


parameter_values = st.one_of(
    st.booleans(),
    st.integers(-(2**63), 2**63 - 1),
    st.text(max_size=8),
)


@given(
    parameters=st.dictionaries(
        st.sampled_from(["sequence_id", "sequence_start", "sequence_end", "priority", "x" * 200]),
        parameter_values,
        max_size=4,
    ),
    tensor_bytes=st.integers(0, 300),
)
def test_the_sequence_read_from_bytes_is_what_protobuf_reads(parameters: dict, tensor_bytes: int) -> None:
    request = kserve.ModelInferRequest(model_name="m", raw_input_contents=[b"\0" * tensor_bytes])
    for key, value in parameters.items():
        field = {bool: "bool_param", int: "int64_param", str: "string_param"}[type(value)]
        setattr(request.parameters[key], field, value)
    expected = None
    sequence_id = parameters.get("sequence_id")
    if sequence_id is not None and not isinstance(sequence_id, bool) and sequence_id not in (0, ""):
        start = parameters.get("sequence_start")
        expected = SequenceCall(str(sequence_id), start is True)
    assert read_sequence(request.SerializeToString()) == expected


@given(st.binary(max_size=64))
def test_any_bytes_give_a_sequence_or_none_and_never_raise(data: bytes) -> None:
    found = read_sequence(data)
    assert found is None or isinstance(found, SequenceCall)
