"""The thin slice end to end: store -> shard map -> agents load two real Tritons -> router -> tritonclient."""

from __future__ import annotations

import asyncio
import json
import queue
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.grpc import service_pb2 as kserve_pb
from tritonclient.utils import InferenceServerException

from modelyard.containers.triton.adapter import triton_model_name
from modelyard.fleet_secret import FLEET_SECRET_HEADER
from modelyard.local import LocalFleet
from modelyard.placement import registry
from modelyard.v1 import inference_pb2, router_pb2, router_pb2_grpc
from tests.conftest import _wipe, require_triton
from tests.fleet import FleetThread

# scale only on triton-0, identity and stream only on triton-1, add_sub on both.
PLAN = {
    "scale@1": ["triton-0"],
    "identity@1": ["triton-1"],
    "add_sub@1": ["triton-0", "triton-1"],
    "stream@1": ["triton-1"],
}


@pytest.fixture(scope="module", params=["embedded", "etcd"])
def fleet(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[FleetThread]:
    require_triton()
    workdir = tmp_path_factory.mktemp(f"fleet-{request.param}")
    if request.param == "etcd":
        url = request.getfixturevalue("etcd_server").url
        asyncio.run(_wipe(url))
    else:
        url = str(workdir / "store")
    thread = FleetThread(workdir, url)

    async def setup(fleet: LocalFleet) -> None:
        models = await fleet.start_store_and_models()
        await fleet.start_containers()
        await registry.write_shard_map(fleet.store, PLAN, expected_generation=0)
        await fleet.start_router()
        await fleet.wait_ready(models, timeout_s=120)

    try:
        thread.start(setup)
        yield thread
    finally:
        thread.stop()


@pytest.fixture
def client(fleet: FleetThread) -> Iterator[grpcclient.InferenceServerClient]:
    with grpcclient.InferenceServerClient(fleet.address) as c:
        yield c


def triton_client(fleet: FleetThread, index: int) -> grpcclient.InferenceServerClient:
    """A direct client to a Triton of the fleet; its calls need `operator(fleet)` as headers."""
    return grpcclient.InferenceServerClient(fleet.fleet.tritons[index].address)


def operator(fleet: FleetThread) -> dict[str, str]:
    """The headers of a trusted operator: Tritons answer only calls carrying the fleet secret, and the
    router gives container addresses only to route readers (the fleet secret makes one)."""
    return {FLEET_SECRET_HEADER: fleet.fleet.fleet_secret}


def fp32_input(name: str, values: np.ndarray) -> grpcclient.InferInput:
    tensor = grpcclient.InferInput(name, list(values.shape), "FP32")
    tensor.set_data_from_numpy(values.astype(np.float32))
    return tensor


def inference_count(fleet: FleetThread, index: int, model: str) -> int:
    with triton_client(fleet, index) as direct:
        stats = direct.get_inference_statistics(
            triton_model_name(model, "1"), headers=operator(fleet)
        ).model_stats
    return sum(s.inference_count for s in stats)


def settled_counts(
    fleet: FleetThread, model: str, expected_total: int, on: tuple[int, ...] = (0, 1)
) -> list[int]:
    """Per-Triton counts once they add up: Triton records statistics just after sending a response."""
    deadline = time.monotonic() + 5
    while True:
        counts = [inference_count(fleet, i, model) for i in on]
        if sum(counts) >= expected_total or time.monotonic() > deadline:
            return counts
        time.sleep(0.05)


def test_models_on_two_different_tritons_both_answer_through_the_router(
    fleet: FleetThread, client: grpcclient.InferenceServerClient
) -> None:
    secret = operator(fleet)
    with triton_client(fleet, 0) as t0, triton_client(fleet, 1) as t1:
        # Triton holds each version under its internal name.
        scale, identity = triton_model_name("scale", "1"), triton_model_name("identity", "1")
        assert t0.is_model_ready(scale, headers=secret) and not t1.is_model_ready(scale, headers=secret)
        assert t1.is_model_ready(identity, headers=secret) and not t0.is_model_ready(identity, headers=secret)
    scale_before = inference_count(fleet, 0, "scale")
    identity_before = inference_count(fleet, 1, "identity")

    rng = np.random.default_rng(7)
    for _ in range(3):
        x = rng.normal(size=17).astype(np.float32)
        scaled = client.infer("scale", [fp32_input("INPUT", x)]).as_numpy("OUTPUT")
        np.testing.assert_allclose(scaled, x * 2.0, rtol=1e-6)
        echoed = client.infer("identity", [fp32_input("INPUT", x)]).as_numpy("OUTPUT")
        np.testing.assert_array_equal(echoed, x)

    # Each call reached the one Triton that holds the model.
    assert settled_counts(fleet, "scale", scale_before + 3, on=(0,)) == [scale_before + 3]
    assert settled_counts(fleet, "identity", identity_before + 3, on=(1,)) == [identity_before + 3]


def test_replicated_model_answers_correctly_from_both_copies(
    fleet: FleetThread, client: grpcclient.InferenceServerClient
) -> None:
    before = settled_counts(fleet, "add_sub", 0)
    rng = np.random.default_rng(11)
    calls = 40
    for _ in range(calls):
        a, b = rng.normal(size=4).astype(np.float32), rng.normal(size=4).astype(np.float32)
        result = client.infer("add_sub", [fp32_input("INPUT0", a), fp32_input("INPUT1", b)])
        np.testing.assert_allclose(result.as_numpy("OUTPUT0"), a + b, rtol=1e-6)
        np.testing.assert_allclose(result.as_numpy("OUTPUT1"), a - b, rtol=1e-6)
    after = settled_counts(fleet, "add_sub", sum(before) + calls)
    served = [after[i] - before[i] for i in (0, 1)]
    assert sum(served) == calls
    assert min(served) > 0, f"one copy got no traffic: {served}"


def test_unknown_model_returns_not_found_naming_the_model(client: grpcclient.InferenceServerClient) -> None:
    with pytest.raises(InferenceServerException) as caught:
        client.infer("no_such_model", [fp32_input("INPUT", np.ones(3))])
    assert caught.value.status() == "StatusCode.NOT_FOUND"
    assert "no_such_model" in caught.value.message()


def test_unknown_version_returns_not_found_naming_it(client: grpcclient.InferenceServerClient) -> None:
    with pytest.raises(InferenceServerException) as caught:
        client.infer("scale", [fp32_input("INPUT", np.ones(3))], model_version="99")
    assert caught.value.status() == "StatusCode.NOT_FOUND"
    assert "'99'" in caught.value.message() and "scale" in caught.value.message()


def test_tensor_shape_mismatch_returns_invalid_argument(client: grpcclient.InferenceServerClient) -> None:
    tensor = fp32_input("INPUT", np.ones(3))
    tensor.set_shape([5])  # declares 5 elements, carries 3
    with pytest.raises(InferenceServerException) as caught:
        client.infer("scale", [tensor])
    assert caught.value.status() == "StatusCode.INVALID_ARGUMENT"


def test_a_tritons_error_names_the_model_as_the_caller_sent_it_not_its_internal_name(
    client: grpcclient.InferenceServerClient,
) -> None:
    """Triton knows the version as 'scale@1' and says so; the caller asked for 'scale' (version 1)."""
    wrong_type = grpcclient.InferInput("INPUT", [3], "INT32")
    wrong_type.set_data_from_numpy(np.array([1, 2, 3], dtype=np.int32))
    with pytest.raises(InferenceServerException) as caught:
        client.infer("scale", [wrong_type], request_id="caller-7")
    message = caught.value.message()
    assert caught.value.status() == "StatusCode.INVALID_ARGUMENT"
    assert "'scale' version '1'" in message and "data-type is 'INT32'" in message, message
    assert "scale@1" not in message and "[request id: caller-7]" in message


def test_bytes_that_are_not_a_request_return_invalid_argument(fleet: FleetThread) -> None:
    with grpc.insecure_channel(fleet.address) as channel:
        infer = channel.unary_unary("/inference.GRPCInferenceService/ModelInfer")
        with pytest.raises(grpc.RpcError) as caught:
            infer(b"\x0a\xff\xff\xff", timeout=5)  # field 1 claims far more bytes than follow
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "malformed" in caught.value.details()


def test_missing_model_name_returns_invalid_argument(fleet: FleetThread) -> None:
    request = inference_pb2.InferRequest(model_version="1")
    with grpc.insecure_channel(fleet.address) as channel:
        with pytest.raises(grpc.RpcError) as caught:
            router_pb2_grpc.RouterStub(channel).Infer(request, timeout=5)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "model_name" in caught.value.details()


def test_router_keeps_serving_after_bad_requests(
    fleet: FleetThread, client: grpcclient.InferenceServerClient
) -> None:
    with grpc.insecure_channel(fleet.address) as channel:
        infer = channel.unary_unary("/inference.GRPCInferenceService/ModelInfer")
        for garbage in (b"\xff", b"\x0a\x05ab", b"\x08"):
            with pytest.raises(grpc.RpcError):
                infer(garbage, timeout=5)
    with pytest.raises(InferenceServerException):
        client.infer("no_such_model", [fp32_input("INPUT", np.ones(3))])
    x = np.arange(5, dtype=np.float32)
    np.testing.assert_allclose(client.infer("scale", [fp32_input("INPUT", x)]).as_numpy("OUTPUT"), x * 2)
    assert client.is_server_live()


def test_server_and_model_status_calls(client: grpcclient.InferenceServerClient) -> None:
    assert client.is_server_live()
    assert client.is_server_ready()
    assert client.is_model_ready("identity")
    assert not client.is_model_ready("no_such_model")
    metadata = client.get_model_metadata("add_sub")
    assert metadata.name == "add_sub"
    assert sorted(i.name for i in metadata.inputs) == ["INPUT0", "INPUT1"]
    assert [o.datatype for o in metadata.outputs] == ["FP32", "FP32"]
    config = client.get_model_config("scale").config
    assert config.name == "scale" and config.backend == "python"


def test_modelyard_v1_infer_and_where_is(fleet: FleetThread) -> None:
    x = np.array([0.5, -1.5, 3.0], dtype=np.float32)
    request = inference_pb2.InferRequest(model_name="scale")
    request.inputs.add(name="INPUT", datatype="FP32", shape=[3])
    request.raw_input_contents.append(x.tobytes())
    with grpc.insecure_channel(fleet.address) as channel:
        stub = router_pb2_grpc.RouterStub(channel)
        response = stub.Infer(request, timeout=10)
        add_sub = router_pb2.WhereIsRequest(model_name="add_sub")
        located = stub.WhereIs(add_sub, timeout=5, metadata=tuple(operator(fleet).items()))
        anonymous = stub.WhereIs(add_sub, timeout=5)
        with pytest.raises(grpc.RpcError) as caught:
            stub.WhereIs(router_pb2.WhereIsRequest(model_name="nope"), timeout=5)
    assert response.model_name == "scale" and response.model_version == "1"
    assert response.outputs[0].name == "OUTPUT"
    np.testing.assert_allclose(np.frombuffer(response.raw_output_contents[0], dtype=np.float32), x * 2)
    assert [(c.container_id, c.state) for c in located.locations[0].copies] == [
        ("triton-0", "ready"),
        ("triton-1", "ready"),
    ]
    addresses = {t.address for t in fleet.fleet.tritons}
    assert {c.address for c in located.locations[0].copies} == addresses
    # A caller who is no route reader learns where copies stand, not how to reach their containers.
    assert [(c.container_id, c.state, c.address) for c in anonymous.locations[0].copies] == [
        ("triton-0", "ready", ""),
        ("triton-1", "ready", ""),
    ]
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND


def test_agents_record_each_copy_s_measured_memory(fleet: FleetThread) -> None:
    async def states() -> dict:  # type: ignore[type-arg]
        return (await registry.load_fleet(fleet.fleet.store)).states

    measured = {key: s.measured_bytes for key, s in fleet.call(states()).items()}
    assert set(measured) == {(cid, key) for key, ids in PLAN.items() for cid in ids}
    # Each python-backend copy runs a stub process of its own: tens of MiB resident, whatever was declared.
    assert all(8 * 2**20 < b < 1024 * 2**20 for b in measured.values()), measured


# -- streaming: KServe ModelStreamInfer (bidi) with a real decoupled Triton model ----------------------


def collect(client: grpcclient.InferenceServerClient, sends: list[tuple[str, np.ndarray]], expect: int):  # type: ignore[no-untyped-def]
    results: queue.Queue = queue.Queue()  # type: ignore[type-arg]
    client.start_stream(callback=lambda result, error: results.put((result, error)))
    try:
        for model, values in sends:
            tensor = grpcclient.InferInput("INPUT", [values.size], "FP32")
            tensor.set_data_from_numpy(values.astype(np.float32))
            client.async_stream_infer(model, [tensor], enable_empty_final_response=model == "stream")
        return [results.get(timeout=30) for _ in range(expect)]
    finally:
        client.stop_stream()


def test_decoupled_model_streams_every_response_in_order_then_the_final_flag(fleet: FleetThread) -> None:
    values = np.array([3.0, 1.0, 4.0, 1.0, 5.0, 9.0], dtype=np.float32)
    with grpcclient.InferenceServerClient(fleet.address) as client:
        got = collect(client, [("stream", values)], expect=len(values) + 1)
    assert all(error is None for _, error in got)
    data = got[:-1]
    assert [r.as_numpy("OUTPUT")[0] for r, _ in data] == list(values)
    assert [r.get_response().parameters["triton_final_response"].bool_param for r, _ in got] == [False] * len(
        values
    ) + [True]


def test_one_stream_reaches_models_on_two_containers(fleet: FleetThread) -> None:
    x = np.array([1.5, -2.0], dtype=np.float32)
    with grpcclient.InferenceServerClient(fleet.address) as client:
        # scale lives on triton-0, stream on triton-1: the router opens one upstream stream to each.
        got = collect(client, [("scale", x), ("stream", x)], expect=1 + len(x) + 1)
    assert all(error is None for _, error in got)
    by_model: dict[str, list[np.ndarray]] = {}
    for result, _ in got:
        response = result.get_response()
        if response.outputs:
            by_model.setdefault(response.model_name, []).append(result.as_numpy("OUTPUT"))
    np.testing.assert_allclose(by_model["scale"][0], x * 2)
    assert [v[0] for v in by_model["stream"]] == list(x)


def test_an_unknown_model_in_a_stream_is_an_in_stream_error_and_the_stream_goes_on(
    fleet: FleetThread,
) -> None:
    x = np.array([2.0], dtype=np.float32)
    with grpcclient.InferenceServerClient(fleet.address) as client:
        got = collect(client, [("no_such_model", x), ("identity", x)], expect=2)
    errors = [error for _, error in got if error is not None]
    results = [result for result, error in got if error is None]
    assert len(errors) == 1 and "no_such_model" in str(errors[0])
    np.testing.assert_array_equal(results[0].as_numpy("OUTPUT"), x)


def _stream_infer_int32(
    fleet: FleetThread, model: str, request_id: str
) -> kserve_pb.ModelStreamInferResponse:
    """One ModelStreamInfer request with an INT32 input (the models take FP32): Triton's in-stream error."""
    request = kserve_pb.ModelInferRequest(model_name=model, id=request_id)
    request.inputs.add(name="INPUT", datatype="INT32", shape=[3])
    request.raw_input_contents.append(np.array([1, 2, 3], dtype=np.int32).tobytes())
    with grpc.insecure_channel(fleet.address) as channel:
        stream = channel.stream_stream(
            "/inference.GRPCInferenceService/ModelStreamInfer",
            request_serializer=kserve_pb.ModelInferRequest.SerializeToString,
            response_deserializer=kserve_pb.ModelStreamInferResponse.FromString,
        )
        responses = stream(iter([request]), timeout=30)
        first: kserve_pb.ModelStreamInferResponse = next(responses)
        responses.cancel()
        return first


def test_an_in_stream_error_carries_the_callers_request_id_and_the_public_model_name(
    fleet: FleetThread,
) -> None:
    """The router sends each streamed request up under an id of its own (streams are shared); Triton's
    error quotes that id and its internal name. The caller reads its own id and the name it sent."""
    answer = _stream_infer_int32(fleet, "scale", "caller-7")
    message = answer.error_message
    assert message.startswith("[request id: caller-7] "), message
    assert "'scale' version '1'" in message and "data-type is 'INT32'" in message, message
    assert "scale@1" not in message
    assert answer.infer_response.id == "caller-7"
    anonymous = _stream_infer_int32(fleet, "scale", "").error_message  # no id sent: none quoted
    assert "request id" not in anonymous and "'scale' version '1'" in anonymous, anonymous


def test_an_unroutable_request_in_a_stream_answers_with_the_callers_request_id(fleet: FleetThread) -> None:
    answer = _stream_infer_int32(fleet, "no_such_model", "caller-8")
    assert "no_such_model" in answer.error_message and answer.infer_response.id == "caller-8"


# -- modelyard.v1 from stubs generated out of protos/ alone --------------------------------------------

CLIENT = """
import json, sys
import grpc, numpy as np
from modelyard.v1 import inference_pb2 as inf, router_pb2 as r, router_pb2_grpc as rg
assert "site-packages" not in inf.__file__, inf.__file__  # the freshly generated stubs, not the package

def request(model, values):
    req = inf.InferRequest(model_name=model, id="req-1")
    req.inputs.add(name="INPUT", datatype="FP32", shape=[len(values)])
    req.raw_input_contents.append(np.array(values, dtype=np.float32).tobytes())
    return req

def floats(response):
    raw = response.raw_output_contents
    return np.frombuffer(raw[0], dtype=np.float32).tolist() if raw else []

with grpc.insecure_channel(sys.argv[1]) as channel:
    stub = rg.RouterStub(channel)
    unary = stub.Infer(request("scale", [1.0, 2.5]), timeout=10)
    streamed = list(stub.InferStream(request("stream", [7.0, 8.0, 9.0]), timeout=10))
    session = list(stub.InferSession(iter([request("scale", [4.0]), request("identity", [5.0])]), timeout=10))
    routes = {}
    # As anyone, then as a route reader (the fleet secret header, its name and value given as arguments).
    for caller, metadata in (("anonymous", ()), ("reader", ((sys.argv[2], sys.argv[3]),))):
        updates = stub.WatchRoutes(r.WatchRoutesRequest(model_names=["scale"]), timeout=10, metadata=metadata)
        first = next(updates)
        updates.cancel()
        ready = [[c.container_id, c.address] for m in first.models for v in m.versions for c in v.ready]
        routes[caller] = [first.snapshot, [m.model_name for m in first.models], ready]
print(json.dumps({
    "unary": [unary.model_name, floats(unary)],
    "stream": [[floats(x), x.parameters["triton_final_response"].bool_param] for x in streamed],
    "session": sorted(
        [x.infer_response.model_name, floats(x.infer_response), x.error_message] for x in session
    ),
    "routes": routes,
}))
"""


def test_stubs_generated_from_protos_alone_call_all_three_inference_shapes(
    fleet: FleetThread, tmp_path: Path
) -> None:
    from grpc_tools import protoc

    protos = Path(__file__).resolve().parents[1] / "protos"
    include = Path(protoc.__file__).resolve().parent / "_proto"
    sources = [str(p.relative_to(protos)) for p in (protos / "modelyard" / "v1").glob("*.proto")]
    generated = tmp_path / "gen"
    generated.mkdir()
    assert (
        protoc.main(
            [
                "protoc",
                f"-I{protos}",
                f"-I{include}",
                f"--python_out={generated}",
                f"--grpc_python_out={generated}",
                *sources,
            ]
        )
        == 0
    )
    site = next(p for p in sys.path if p.endswith("site-packages"))
    # -S: no site hooks, so the installed modelyard package is not importable; only the generated stubs are.
    bootstrap = f"import sys; sys.path[:0] = [{str(generated)!r}, {site!r}]; exec(open(sys.argv[-1]).read())"
    script = tmp_path / "client.py"
    script.write_text(CLIENT)
    result = subprocess.run(
        [sys.executable, "-S", "-c", bootstrap, fleet.address, FLEET_SECRET_HEADER, fleet.fleet.fleet_secret,
         str(script)],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    got = json.loads(result.stdout)
    assert got["unary"] == ["scale", [2.0, 5.0]]
    assert got["stream"] == [[[7.0], False], [[8.0], False], [[9.0], False], [[], True]]
    assert got["session"] == [["identity", [5.0], ""], ["scale", [8.0], ""]]
    assert got["routes"] == {
        "anonymous": [True, ["scale"], []],  # which models it may call, but no container to call them on
        "reader": [True, ["scale"], [["triton-0", fleet.fleet.tritons[0].address]]],
    }


def test_async_infer_through_the_router(client: grpcclient.InferenceServerClient) -> None:
    x = np.linspace(-1, 1, 9, dtype=np.float32)
    results: queue.Queue = queue.Queue()  # type: ignore[type-arg]
    for _ in range(5):
        client.async_infer(
            "scale", [fp32_input("INPUT", x)], callback=lambda result, error: results.put((result, error))
        )
    got = [results.get(timeout=10) for _ in range(5)]
    assert all(error is None for _, error in got)
    assert all(np.allclose(result.as_numpy("OUTPUT"), x * 2) for result, _ in got)
