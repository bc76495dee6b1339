"""Versions stay independent on real Triton: each `name@version` has its own model directory and config.

Before, one `config.pbtxt` per model served every version, so loading scale@2 (factor 3) made scale@1
answer with factor 3. Here v1 (factor 2) and v2 (factor 3) share one Triton through load/unload/reload
cycles of the other version, directly and through the router with a tenant pinned to v1.
"""

from __future__ import annotations

import asyncio
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.grpc.aio as triton_aio

from modelyard.catalog.examples import EXAMPLES_DIR, install_example, install_model_dir
from modelyard.client import Client
from modelyard.containers.triton.adapter import TritonAdapter, triton_model_name
from modelyard.containers.triton.server import TritonServer
from modelyard.fleet_secret import FLEET_SECRET_HEADER
from modelyard.local import LocalFleet
from modelyard.placement import registry
from modelyard.placement.model import ModelVersion, RouteRule
from modelyard.v1 import inference_pb2, router_pb2_grpc
from tests.conftest import require_triton
from tests.fleet import FleetThread

X = np.array([1.0, -2.0, 0.5], dtype=np.float32)


def scale_v2(tmp: Path, artifacts: Path) -> ModelVersion:
    """scale@2: the `scale` example with factor 3 in its config (v1 has factor 2)."""
    source = tmp / "scale-factor-3"
    shutil.copytree(EXAMPLES_DIR / "scale", source, ignore=shutil.ignore_patterns("__pycache__"))
    config = source / "config.pbtxt"
    text = config.read_text()
    assert 'string_value: "2.0"' in text
    config.write_text(text.replace('string_value: "2.0"', 'string_value: "3.0"'))
    return install_model_dir(source, artifacts, name="scale", version="2")


# -- the adapter on one Triton, no router -------------------------------------------------------------


@pytest.fixture(scope="module")
def triton(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TritonServer]:
    require_triton()
    server = TritonServer(tmp_path_factory.mktemp("triton-versions"))
    try:
        server.start()
        yield server
    finally:
        server.stop()


async def factor_on_triton(client: triton_aio.InferenceServerClient, model: ModelVersion) -> float:
    tensor = triton_aio.InferInput("INPUT", [3], "FP32")
    tensor.set_data_from_numpy(X)
    result = await client.infer(triton_model_name(model.name, model.version), [tensor])
    return float(result.as_numpy("OUTPUT")[0] / X[0])


def test_two_versions_with_different_configs_answer_their_own_through_reload_cycles(
    triton: TritonServer, tmp_path: Path
) -> None:
    v1 = install_example("scale", tmp_path / "artifacts", version="1")
    v2 = scale_v2(tmp_path, tmp_path / "artifacts")

    async def run() -> None:
        adapter = TritonAdapter(triton.address, triton.repository)
        client = triton_aio.InferenceServerClient(triton.address)
        try:
            await adapter.load(v1)
            assert await factor_on_triton(client, v1) == 2.0
            await adapter.load(v2)  # before: rewrote the one config, and v1 answered 3
            assert (await factor_on_triton(client, v1), await factor_on_triton(client, v2)) == (2.0, 3.0)
            assert await adapter.ready_versions() == {"scale@1", "scale@2"}
            for cycle in range(2):
                await adapter.unload(v2)
                assert await factor_on_triton(client, v1) == 2.0, f"cycle {cycle}"
                assert not await client.is_model_ready(triton_model_name("scale", "2"))
                await adapter.load(v2)
                assert await factor_on_triton(client, v2) == 3.0, f"cycle {cycle}"
                await adapter.unload(v1)
                assert await factor_on_triton(client, v2) == 3.0, f"cycle {cycle}"
                await adapter.load(v1)
                assert (await factor_on_triton(client, v1), await factor_on_triton(client, v2)) == (2.0, 3.0)
            await adapter.unload(v1)
            await adapter.unload(v2)
            assert await adapter.ready_versions() == set()
            assert not (triton.repository / "scale@1").exists()
        finally:
            await client.close()
            await adapter.close()

    asyncio.run(run())


# -- through the router: a tenant pinned to v1, everyone else on v2 -------------------------------------


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FleetThread]:
    require_triton()
    workdir = tmp_path_factory.mktemp("versions-fleet")
    thread = FleetThread(workdir, str(workdir / "store"), containers=1)

    async def setup(fleet: LocalFleet) -> None:
        await fleet.start_store_and_models(examples=False)
        models = [install_example("scale", workdir / "artifacts"), scale_v2(workdir, workdir / "artifacts")]
        for model in models:
            await registry.register_model(fleet.store, model)
        await registry.put_route_rule(fleet.store, RouteRule("scale", tenant_versions=(("acme", "1"),)))
        await fleet.start_containers()
        plan = {m.key: ["triton-0"] for m in models}
        await registry.write_shard_map(fleet.store, plan, expected_generation=0)
        await fleet.start_router()
        await fleet.wait_ready(models, timeout_s=120)

    try:
        thread.start(setup)
        yield thread
    finally:
        thread.stop()


def infer(address: str, tenant: str | None, version: str = "") -> grpcclient.InferResult:
    tensor = grpcclient.InferInput("INPUT", [3], "FP32")
    tensor.set_data_from_numpy(X)
    headers = {"x-tenant-id": tenant} if tenant else None
    with grpcclient.InferenceServerClient(address) as client:
        return client.infer("scale", [tensor], model_version=version, headers=headers, client_timeout=30)


def answer(result: grpcclient.InferResult) -> tuple[str, str, float]:
    response = result.get_response()
    return response.model_name, response.model_version, float(result.as_numpy("OUTPUT")[0] / X[0])


def test_a_tenant_pinned_to_v1_gets_v1_s_answers_and_others_v2_s(fleet: FleetThread) -> None:
    assert answer(infer(fleet.address, "acme")) == ("scale", "1", 2.0)
    assert answer(infer(fleet.address, "beta")) == ("scale", "2", 3.0)
    assert answer(infer(fleet.address, None, version="1")) == ("scale", "1", 2.0)


def test_status_calls_show_each_version_s_public_name_and_own_config(fleet: FleetThread) -> None:
    with grpcclient.InferenceServerClient(fleet.address) as client:
        configs = {v: client.get_model_config("scale", v).config for v in ("1", "2")}
        metadata = client.get_model_metadata("scale", "1")
        stats = client.get_inference_statistics("scale", "2").model_stats
        assert client.is_model_ready("scale", "1") and client.is_model_ready("scale", "2")
    assert [c.name for c in configs.values()] == ["scale", "scale"]
    assert [c.parameters["factor"].string_value for c in configs.values()] == ["2.0", "3.0"]
    assert (metadata.name, list(metadata.versions)) == ("scale", ["1"])
    assert [(s.name, s.version) for s in stats] == [("scale", "2")]


def request(model: str, values: list[float]) -> inference_pb2.InferRequest:
    req = inference_pb2.InferRequest(model_name=model, id="r1")
    req.inputs.add(name="INPUT", datatype="FP32", shape=[len(values)])
    req.raw_input_contents.append(np.array(values, dtype=np.float32).tobytes())
    return req


def test_streams_show_the_public_name_and_the_pinned_version(fleet: FleetThread) -> None:
    acme = (("x-tenant-id", "acme"),)
    with grpc.insecure_channel(fleet.address) as channel:
        stub = router_pb2_grpc.RouterStub(channel)
        streamed = list(stub.InferStream(request("scale", [1.0]), metadata=acme, timeout=30))
        session = list(stub.InferSession(iter([request("scale", [1.0])]), metadata=acme, timeout=30))
    outputs = [r for r in streamed if r.raw_output_contents]
    assert [(r.model_name, r.model_version, r.id) for r in outputs] == [("scale", "1", "r1")]
    assert np.frombuffer(outputs[0].raw_output_contents[0], dtype=np.float32).tolist() == [2.0]
    response = session[0].infer_response
    assert (session[0].error_message, response.model_name, response.model_version) == ("", "scale", "1")
    assert np.frombuffer(response.raw_output_contents[0], dtype=np.float32).tolist() == [2.0]


def test_zero_hop_client_calls_triton_under_the_internal_name(fleet: FleetThread) -> None:
    tensor = grpcclient.InferInput("INPUT", [3], "FP32")
    tensor.set_data_from_numpy(X)
    # A trusted service holds the fleet secret: it reads routes and calls the container itself.
    with Client(fleet.address, tenant="acme", fleet_secret=fleet.fleet.fleet_secret) as client:
        assert client.wait_synced()
        result = client.infer("scale", [tensor])
        assert client.direct_calls == 1 and client.router_calls == 0
    assert answer(result) == ("scale", "1", 2.0)
    # Without it the client learns no container address: the same answer, through the router.
    with Client(fleet.address, tenant="acme") as client:
        assert client.wait_synced()
        result = client.infer("scale", [tensor])
        assert client.direct_calls == 0 and client.router_calls == 1
    assert answer(result) == ("scale", "1", 2.0)


def wait_for(condition: object, what: str, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():  # type: ignore[operator]
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def test_unloading_and_reloading_v2_never_changes_v1(fleet: FleetThread) -> None:
    triton = fleet.fleet.tritons[0].address
    v2 = triton_model_name("scale", "2")

    secret = {FLEET_SECRET_HEADER: fleet.fleet.fleet_secret}  # Triton answers only the fleet

    def v2_loaded() -> bool:
        # Any error is raised, not read as "not loaded": a refused call must not pass for an unload.
        with grpcclient.InferenceServerClient(triton) as direct:
            return bool(direct.is_model_ready(v2, headers=secret))

    async def assign(v2_on: list[str]) -> None:
        generation = await registry.read_generation(fleet.fleet.store)
        plan = {"scale@1": ["triton-0"], "scale@2": v2_on}
        await registry.write_shard_map(fleet.fleet.store, plan, expected_generation=generation)

    for _ in range(2):
        fleet.call(assign([]))
        wait_for(lambda: not v2_loaded(), "the agent to unload scale@2")
        assert answer(infer(fleet.address, "acme")) == ("scale", "1", 2.0)
        fleet.call(assign(["triton-0"]))
        wait_for(v2_loaded, "the agent to load scale@2 again")
        wait_for(
            lambda: (
                fleet.fleet.router is not None
                and bool(fleet.fleet.router.router.table.ready_copies("scale@2"))
            ),
            "the router to see scale@2 ready",
        )
        assert answer(infer(fleet.address, "acme")) == ("scale", "1", 2.0)
        assert answer(infer(fleet.address, "beta")) == ("scale", "2", 3.0)
