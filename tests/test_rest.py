"""KServe v2 REST on the router, called with `tritonclient.http` (and plain HTTP for malformed requests):
the same answers as `tritonclient.grpc` through the same router, on real Tritons and our container."""

from __future__ import annotations

import dataclasses
import http.client
import json
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from modelyard.catalog import pipelines
from modelyard.catalog.examples import install_example
from modelyard.catalog.triton_repo import ensemble_pipeline, read_config
from modelyard.local import LocalFleet
from modelyard.placement import registry
from modelyard.placement.pipeline import parse_pipeline
from modelyard.router.identity import Authenticator, IdentityFile, token_key
from modelyard.router.server import RouterServer
from tests.conftest import require_triton, stop_process
from tests.fleet import FleetThread
from tests.test_triton_repos import ENSEMBLE_CONFIG

MAX_BODY_BYTES = 1024 * 1024


class RestFleet(FleetThread):
    token_router: RouterServer


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RestFleet]:
    """The example models on two Tritons and `linear` on our container; `secret` (identity) private to
    acme; `lazy` (scale) loaded on demand; double_twice, a Triton ensemble (scale twice) as a pipeline.
    A second router over the same store identifies callers by bearer token only."""
    require_triton()
    workdir = tmp_path_factory.mktemp("rest")
    thread = RestFleet(workdir, str(workdir / "store"), containers=2)
    thread.fleet.custom_containers = 1
    thread.fleet.http_port = 0
    tokens = workdir / "tokens"
    tokens.write_text(f"{token_key('acme-token')} acme\n{token_key('public-token')} -\n")

    async def setup(fleet: LocalFleet) -> None:
        models = await fleet.start_store_and_models()
        artifacts = fleet.artifacts_dir
        secret = dataclasses.replace(install_example("identity", artifacts), name="secret", tenants=("acme",))
        lazy = dataclasses.replace(install_example("scale", artifacts), name="lazy", replicas=0)
        for model in (secret, lazy):
            await registry.register_model(fleet.store, model)
        await fleet.start_containers()
        fleet.supervise_containers()
        await fleet.wait_registered(60)
        fleet.start_controller()
        await fleet.start_router()
        await fleet.wait_ready([*models, secret], timeout_s=120)
        # A Triton ensemble's config.pbtxt, registered as `models import --triton-repo` registers it.
        ensemble = workdir / "double_twice"
        ensemble.mkdir()
        (ensemble / "config.pbtxt").write_text(ENSEMBLE_CONFIG)
        spec = ensemble_pipeline("double_twice", "1", read_config(ensemble), ())
        await pipelines.register(fleet.store, parse_pipeline(spec))
        identity = Authenticator(tokens=IdentityFile(tokens, "token file"))
        thread.token_router = RouterServer(
            fleet.store, port=0, identity=identity, fleet_secret=fleet.fleet_secret, http_port=0,
            max_message_bytes=MAX_BODY_BYTES, follower=fleet.follower,
        )  # fmt: skip
        await thread.token_router.start()

    try:
        thread.start(setup)
        yield thread
    finally:
        if getattr(thread, "token_router", None) is not None:
            thread.call(thread.token_router.stop(0))
        thread.stop()


def rest_address(fleet: FleetThread) -> str:
    assert fleet.fleet.router is not None and fleet.fleet.router.rest_address is not None
    return fleet.fleet.router.rest_address


@pytest.fixture
def rest(fleet: RestFleet) -> Iterator[httpclient.InferenceServerClient]:
    with httpclient.InferenceServerClient(rest_address(fleet)) as client:
        yield client


@pytest.fixture
def grpc_client(fleet: RestFleet) -> Iterator[grpcclient.InferenceServerClient]:
    with grpcclient.InferenceServerClient(fleet.address) as client:
        yield client


def raw_post(address: str, path: str, body: bytes, headers: dict[str, str] | None = None) -> tuple[int, Any]:
    """A plain HTTP POST: status and the JSON body."""
    host, port = address.rsplit(":", 1)
    connection = http.client.HTTPConnection(host, int(port), timeout=30)
    try:
        connection.request("POST", path, body=body, headers=headers or {})
        response = connection.getresponse()
        return response.status, json.loads(response.read() or b"null")
    finally:
        connection.close()


EXAMPLES: dict[str, dict[str, np.ndarray]] = {
    "scale": {"INPUT": np.array([1.0, -2.5, 3.0], dtype=np.float32)},
    "identity": {"INPUT": np.arange(7, dtype=np.float32)},
    "add_sub": {
        "INPUT0": np.array([1, 2, 3, 4], dtype=np.float32),
        "INPUT1": np.array([0.5, 0.5, 0.5, 0.5], dtype=np.float32),
    },
    "linear": {"INPUT": np.arange(8, dtype=np.float32).reshape(2, 4)},
    "double_twice": {"X": np.array([1.0, 2.0], dtype=np.float32)},
    "lazy": {"INPUT": np.array([4.0], dtype=np.float32)},
}


def http_infer(
    client: httpclient.InferenceServerClient, model: str, binary: bool, version: str = "", **kwargs: Any
) -> httpclient.InferResult:
    inputs = []
    for name, values in EXAMPLES[model].items():
        tensor = httpclient.InferInput(name, list(values.shape), "FP32")
        tensor.set_data_from_numpy(values, binary_data=binary)
        inputs.append(tensor)
    outputs = None
    if not binary:  # JSON both ways: outputs asked for by name, as JSON
        metadata = client.get_model_metadata(model)
        outputs = [httpclient.InferRequestedOutput(o["name"], binary_data=False) for o in metadata["outputs"]]
    return client.infer(model, inputs, model_version=version, outputs=outputs, **kwargs)


def grpc_infer(client: grpcclient.InferenceServerClient, model: str) -> grpcclient.InferResult:
    inputs = []
    for name, values in EXAMPLES[model].items():
        tensor = grpcclient.InferInput(name, list(values.shape), "FP32")
        tensor.set_data_from_numpy(values)
        inputs.append(tensor)
    return client.infer(model, inputs)


def test_health_and_server_metadata_answer(rest: httpclient.InferenceServerClient) -> None:
    assert rest.is_server_live() and rest.is_server_ready()
    assert rest.get_server_metadata()["name"] == "modelyard"


@pytest.mark.parametrize("model", ["scale", "identity", "add_sub", "linear", "double_twice"])
@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
def test_every_example_answers_rest_as_it_answers_grpc(
    model: str,
    binary: bool,
    rest: httpclient.InferenceServerClient,
    grpc_client: grpcclient.InferenceServerClient,
) -> None:
    assert rest.is_model_ready(model) and grpc_client.is_model_ready(model)
    by_grpc = grpc_infer(grpc_client, model)
    by_rest = http_infer(rest, model, binary)
    grpc_outputs = by_grpc.get_response().outputs
    assert [o["name"] for o in by_rest.get_response()["outputs"]] == [o.name for o in grpc_outputs]
    for output in grpc_outputs:
        expected = by_grpc.as_numpy(output.name)
        got = by_rest.as_numpy(output.name)
        assert got.dtype == expected.dtype and got.shape == expected.shape
        np.testing.assert_array_equal(got, expected)
    assert by_rest.get_response()["model_name"] == by_grpc.get_response().model_name == model
    metadata = rest.get_model_metadata(model)
    grpc_metadata = grpc_client.get_model_metadata(model, as_json=True)
    for what in ("inputs", "outputs"):
        assert [(t["name"], t["datatype"], [int(d) for d in t["shape"]]) for t in metadata[what]] == [
            (t["name"], t["datatype"], [int(d) for d in t["shape"]]) for t in grpc_metadata[what]
        ]


def test_model_config_and_statistics_answer_as_on_grpc(
    rest: httpclient.InferenceServerClient, grpc_client: grpcclient.InferenceServerClient
) -> None:
    config = rest.get_model_config("scale")
    assert config["name"] == "scale" == grpc_client.get_model_config("scale").config.name
    assert [i["name"] for i in config["input"]] == ["INPUT"]
    http_infer(rest, "scale", True)
    stats = rest.get_inference_statistics("scale")["model_stats"]
    assert [s["name"] for s in stats] == ["scale"] and int(stats[0]["inference_count"]) >= 1


def test_a_version_in_the_path_is_used_and_an_unknown_one_is_not_found(
    rest: httpclient.InferenceServerClient,
) -> None:
    assert http_infer(rest, "scale", True, version="1").get_response()["model_version"] == "1"
    assert rest.is_model_ready("scale", "1") and not rest.is_model_ready("scale", "9")
    with pytest.raises(InferenceServerException) as refused:
        http_infer(rest, "scale", True, version="9")
    assert refused.value.status() == "404"
    assert "version '9'" in refused.value.message()


def test_a_model_with_no_copy_is_loaded_on_the_first_rest_call(
    rest: httpclient.InferenceServerClient,
) -> None:
    result = http_infer(rest, "lazy", True)
    np.testing.assert_array_equal(result.as_numpy("OUTPUT"), EXAMPLES["lazy"]["INPUT"] * 2)


def test_an_unknown_model_is_not_found_in_json(
    rest: httpclient.InferenceServerClient, fleet: RestFleet
) -> None:
    status, body = raw_post(
        rest_address(fleet), "/v2/models/nope/infer",
        json.dumps({"inputs": [{"name": "INPUT", "shape": [1], "datatype": "FP32", "data": [1]}]}).encode(),
    )  # fmt: skip
    assert status == 404 and "nope" in body["error"]


def test_a_private_model_is_missing_for_another_tenant_and_answers_its_own(fleet: RestFleet) -> None:
    with httpclient.InferenceServerClient(rest_address(fleet)) as client:
        with pytest.raises(InferenceServerException) as other:
            client.get_model_metadata("secret", headers={"x-tenant-id": "zed"})
        assert other.value.status() == "404"
        with pytest.raises(InferenceServerException) as missing:
            client.get_model_metadata("never-registered", headers={"x-tenant-id": "zed"})
        assert missing.value.message().replace("never-registered", "secret") == other.value.message()
        tensor = httpclient.InferInput("INPUT", [2], "FP32")
        tensor.set_data_from_numpy(np.array([5.0, 6.0], dtype=np.float32))
        result = client.infer("secret", [tensor], headers={"x-tenant-id": "acme"})
        np.testing.assert_array_equal(result.as_numpy("OUTPUT"), [5.0, 6.0])


def test_bearer_tokens_identify_rest_callers_like_grpc_ones(fleet: RestFleet) -> None:
    address = fleet.token_router.rest_address
    assert address is not None
    tensor = httpclient.InferInput("INPUT", [2], "FP32")
    tensor.set_data_from_numpy(np.array([5.0, 6.0], dtype=np.float32))
    with httpclient.InferenceServerClient(address) as client:
        with pytest.raises(InferenceServerException) as anonymous:
            client.infer("scale", [tensor])
        assert anonymous.value.status() == "401"
        with pytest.raises(InferenceServerException) as wrong:
            client.infer("scale", [tensor], headers={"Authorization": "Bearer not-a-token"})
        assert wrong.value.status() == "401" and "unknown bearer token" in wrong.value.message()
        with pytest.raises(InferenceServerException) as public:
            client.infer("secret", [tensor], headers={"Authorization": "Bearer public-token"})
        assert public.value.status() == "404"
        with pytest.raises(InferenceServerException) as spoofed:
            client.infer(
                "secret", [tensor], headers={"Authorization": "Bearer public-token", "x-tenant-id": "acme"}
            )
        assert spoofed.value.status() == "403"
        result = client.infer("secret", [tensor], headers={"Authorization": "Bearer acme-token"})
        np.testing.assert_array_equal(result.as_numpy("OUTPUT"), [5.0, 6.0])


@pytest.mark.parametrize(
    "body, headers, message",
    [
        (b"{not json", {}, "not valid JSON"),
        (b"[1, 2]", {}, "must be a JSON object"),
        (json.dumps({"inputs": []}).encode(), {}, "inputs must be a non-empty list"),
        (
            json.dumps(
                {"inputs": [{"name": "INPUT", "shape": [2], "datatype": "FP32", "data": [1]}]}
            ).encode(),
            {},
            "1 values for shape [2]",
        ),
        (
            json.dumps(
                {"inputs": [{"name": "INPUT", "shape": [1], "datatype": "FP32", "data": ["x"]}]}
            ).encode(),
            {},
            "does not fit FP32",
        ),
        (b"{}", {"Inference-Header-Content-Length": "x"}, "is not a length within the body"),
    ],
    ids=["bad-json", "not-object", "no-inputs", "short-data", "wrong-type", "bad-header-length"],
)
def test_malformed_infer_requests_are_bad_request_naming_the_fault(
    fleet: RestFleet, body: bytes, headers: dict[str, str], message: str
) -> None:
    status, answer = raw_post(rest_address(fleet), "/v2/models/scale/infer", body, headers)
    assert status == 400, answer
    assert message in answer["error"]


def test_binary_data_shorter_than_declared_is_bad_request(fleet: RestFleet) -> None:
    header = json.dumps(
        {
            "inputs": [
                {"name": "INPUT", "shape": [4], "datatype": "FP32", "parameters": {"binary_data_size": 16}}
            ]
        }
    ).encode()
    status, answer = raw_post(
        rest_address(fleet), "/v2/models/scale/infer", header + b"\0" * 8,
        {"Inference-Header-Content-Length": str(len(header))},
    )  # fmt: skip
    assert status == 400 and "runs past the end of the body" in answer["error"]


def test_a_body_over_the_limit_is_refused_with_413(fleet: RestFleet) -> None:
    address = fleet.token_router.rest_address
    assert address is not None
    status, answer = raw_post(address, "/v2/models/scale/infer", b" " * (MAX_BODY_BYTES + 1))
    assert status == 413 and "over the router's limit" in answer["error"]
    # The router still answers afterwards.
    status, answer = raw_post(
        address, "/v2/models/scale/infer", b"{}", {"Authorization": "Bearer acme-token"}
    )
    assert status == 400


def test_a_decoupled_model_is_refused_cleanly_as_on_grpc(
    rest: httpclient.InferenceServerClient, grpc_client: grpcclient.InferenceServerClient
) -> None:
    values = np.array([3.0], dtype=np.float32)
    tensor = httpclient.InferInput("INPUT", [1], "FP32")
    tensor.set_data_from_numpy(values)
    with pytest.raises(InferenceServerException) as by_rest:
        rest.infer("stream", [tensor])
    grpc_tensor = grpcclient.InferInput("INPUT", [1], "FP32")
    grpc_tensor.set_data_from_numpy(values)
    with pytest.raises(InferenceServerException) as by_grpc:
        grpc_client.infer("stream", [grpc_tensor])
    assert by_rest.value.status() in ("400", "501")
    assert by_rest.value.message() == by_grpc.value.message()


def test_unknown_paths_answer_json_not_found(fleet: RestFleet) -> None:
    status, answer = raw_post(rest_address(fleet), "/v2/nothing/here", b"{}")
    assert status == 404 and "error" in answer


def test_a_long_lived_router_keeps_answering_after_many_bad_requests(fleet: RestFleet) -> None:
    for _ in range(50):
        assert raw_post(rest_address(fleet), "/v2/models/scale/infer", b"{")[0] == 400
    status, answer = raw_post(
        rest_address(fleet), "/v2/models/scale/infer",
        json.dumps({"inputs": [{"name": "INPUT", "shape": [1], "datatype": "FP32", "data": [2.5]}]}).encode(),
    )  # fmt: skip
    assert status == 200 and answer["outputs"][0]["data"] == [5.0]


def test_serve_with_http_port_prints_and_answers_rest_and_stops_on_sigterm(tmp_path: Path) -> None:
    command = [sys.executable, "-m", "modelyard", "serve", "--store", str(tmp_path / "s"), "--port", "0"]
    process = subprocess.Popen(
        [*command, "--http-port", "0"], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
        start_new_session=True,
    )  # fmt: skip
    try:
        assert process.stdout is not None
        assert process.stdout.readline().startswith("router listening on 127.0.0.1:")
        line = process.stdout.readline()  # the pipe closes if it dies: no hang
        assert line.startswith("router REST on 127.0.0.1:"), line
        with httpclient.InferenceServerClient(line.split()[3]) as client:
            assert client.is_server_live() and client.is_server_ready()
        process.send_signal(signal.SIGTERM)
        assert process.wait(20) == 0
    finally:
        stop_process(process)  # type: ignore[arg-type]
