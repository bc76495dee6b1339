"""Tenant and version routing through the router and the zero-hop client, on our own containers."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import replace

import grpc
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from modelyard.client import Client
from modelyard.fleet_secret import FLEET_SECRET_HEADER
from modelyard.local import LocalFleet
from modelyard.placement import registry
from modelyard.placement.model import RouteRule
from modelyard.v1 import router_pb2, router_pb2_grpc
from tests.fleet import FleetThread
from tests.test_lazy_load import scale_model

X = np.array([1.0, -2.0, 0.5], dtype=np.float32)


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FleetThread]:
    """m@1 (x1) and m@2 (x2) public, m@3 (x3) private to acme; rule: default 1, beta pinned to 2."""
    workdir = tmp_path_factory.mktemp("tenants")
    thread = FleetThread(workdir, str(workdir / "store"), containers=0)
    thread.fleet.custom_containers = 2

    async def setup(fleet: LocalFleet) -> None:
        await fleet.start_store_and_models(examples=False)
        models = [replace(scale_model(workdir / f"v{v}", "m", float(v)), version=str(v)) for v in (1, 2, 3)]
        models[2] = replace(models[2], tenants=("acme",))
        split = [replace(scale_model(workdir / f"s{v}", "s", float(v)), version=str(v)) for v in (1, 2)]
        for model in models + split:
            await registry.register_model(fleet.store, model)
        await registry.put_route_rule(fleet.store, RouteRule("m", "1", (("beta", "2"),)))
        await registry.put_route_rule(fleet.store, RouteRule("s", weights=(("1", 3), ("2", 1))))
        await fleet.start_containers()
        fleet.start_controller()
        await fleet.start_router()
        await fleet.wait_ready(models + split, timeout_s=60)

    try:
        thread.start(setup)
        yield thread
    finally:
        thread.stop()


def factor_seen(result: grpcclient.InferResult) -> float:
    return float(np.round(result.as_numpy("OUTPUT")[0] / X[0], 3))


def call(
    address: str, model: str, tenant: str | None = None, version: str = "", request_id: str = ""
) -> float:
    tensor = grpcclient.InferInput("INPUT", [3], "FP32")
    tensor.set_data_from_numpy(X)
    headers = {"x-tenant-id": tenant} if tenant else None
    with grpcclient.InferenceServerClient(address) as client:
        result = client.infer(model, [tensor], model_version=version, request_id=request_id, headers=headers)
    return factor_seen(result)


def test_tenants_get_their_pinned_or_the_default_version(fleet: FleetThread) -> None:
    assert call(fleet.address, "m") == 1.0
    assert call(fleet.address, "m", tenant="beta") == 2.0
    assert call(fleet.address, "m", tenant="acme") == 1.0  # no pin: the rule's default


def test_an_explicit_version_wins_when_the_tenant_may_use_it(fleet: FleetThread) -> None:
    assert call(fleet.address, "m", tenant="acme", version="3") == 3.0
    assert call(fleet.address, "m", tenant="beta", version="1") == 1.0


def test_another_tenants_private_version_is_not_found(fleet: FleetThread) -> None:
    for tenant in ("beta", None):
        with pytest.raises(InferenceServerException) as caught:
            call(fleet.address, "m", tenant=tenant, version="3")
        assert caught.value.status() == "StatusCode.NOT_FOUND"
        assert "has no version '3'" in caught.value.message()


def test_a_weighted_split_is_fixed_per_request_id_and_follows_the_weights(fleet: FleetThread) -> None:
    seen = [call(fleet.address, "s", request_id=f"r{i}") for i in range(200)]
    assert [call(fleet.address, "s", request_id=f"r{i}") for i in range(20)] == seen[:20]
    share = seen.count(2.0) / len(seen)
    assert 0.15 < share < 0.35  # weights 3:1


def test_rules_change_without_a_restart(fleet: FleetThread) -> None:
    store = fleet.fleet.store_url
    routes = [sys.executable, "-m", "modelyard", "routes"]
    changed = subprocess.run(
        [*routes, "set", "m", "--default", "2", "--store", store], capture_output=True, text=True
    )
    assert changed.returncode == 0, changed.stderr
    try:
        deadline = time.monotonic() + 5
        while call(fleet.address, "m") != 2.0:
            assert time.monotonic() < deadline, "the router did not follow the new rule"
            time.sleep(0.02)
        assert call(fleet.address, "m", tenant="beta") == 2.0
    finally:
        subprocess.run(
            [*routes, "set", "m", "--default", "1", "--pin", "beta=2", "--store", store], check=True
        )
    bad = subprocess.run(
        [*routes, "set", "m", "--default", "9", "--store", store], capture_output=True, text=True
    )
    assert bad.returncode == 2 and "has no version 9" in bad.stderr


def where_is(
    address: str, model: str, metadata: tuple[tuple[str, str], ...] = ()
) -> router_pb2.WhereIsResponse:
    with grpc.insecure_channel(address) as channel:
        answer: router_pb2.WhereIsResponse = router_pb2_grpc.RouterStub(channel).WhereIs(
            router_pb2.WhereIsRequest(model_name=model), timeout=5, metadata=metadata
        )
    return answer


def test_where_is_lists_the_versions_the_tenant_may_call_and_their_copies(fleet: FleetThread) -> None:
    mine = where_is(fleet.address, "m", (("x-tenant-id", "acme"),))
    assert [loc.model_version for loc in mine.locations] == ["1", "2", "3"]
    assert all(len(loc.copies) == 1 and loc.copies[0].state == "ready" for loc in mine.locations)
    for tenant in ("beta", None):  # m@3 is acme's: nobody else learns where it runs, or that it exists
        metadata = (("x-tenant-id", tenant),) if tenant else ()
        answer = where_is(fleet.address, "m", metadata)
        assert [loc.model_version for loc in answer.locations] == ["1", "2"]


def test_where_is_gives_container_addresses_only_to_route_readers(fleet: FleetThread) -> None:
    plain = where_is(fleet.address, "m", (("x-tenant-id", "acme"),))
    assert {c.address for loc in plain.locations for c in loc.copies} == {""}
    secret = (("x-tenant-id", "acme"), (FLEET_SECRET_HEADER, fleet.fleet.fleet_secret))
    reader = where_is(fleet.address, "m", secret)
    addresses = {c.address for loc in reader.locations for c in loc.copies}
    assert addresses and all(a.startswith("127.0.0.1:") for a in addresses)


def watch_snapshot(address: str, metadata: tuple[tuple[str, str], ...]) -> router_pb2.RouteUpdate:
    with grpc.insecure_channel(address) as channel:
        stream = router_pb2_grpc.RouterStub(channel).WatchRoutes(
            router_pb2.WatchRoutesRequest(), timeout=10, metadata=metadata
        )
        snapshot: router_pb2.RouteUpdate = next(iter(stream))
        stream.cancel()
    return snapshot


def test_watch_routes_sends_a_tenant_only_what_it_may_call(fleet: FleetThread) -> None:
    secret = (FLEET_SECRET_HEADER, fleet.fleet.fleet_secret)
    beta = watch_snapshot(fleet.address, (("x-tenant-id", "beta"), secret))
    m = next(entry for entry in beta.models if entry.model_name == "m")
    assert [v.version for v in m.versions] == ["1", "2"]
    assert dict(m.rule.tenant_versions) == {"beta": "2"}  # its own pin, nobody else's
    assert "acme" not in str(beta)
    acme = watch_snapshot(fleet.address, (("x-tenant-id", "acme"), secret))
    m = next(entry for entry in acme.models if entry.model_name == "m")
    assert [(v.version, list(v.tenants)) for v in m.versions] == [("1", []), ("2", []), ("3", ["acme"])]
    assert dict(m.rule.tenant_versions) == {}  # beta's pin is beta's business
    assert "beta" not in str(acme)
    assert all(v.ready and v.ready[0].address for v in m.versions)


def test_watch_routes_sends_addresses_only_to_route_readers(fleet: FleetThread) -> None:
    snapshot = watch_snapshot(fleet.address, (("x-tenant-id", "acme"),))
    assert {e.model_name for e in snapshot.models} == {"m", "s"}
    assert all(not v.ready for e in snapshot.models for v in e.versions)


def test_zero_hop_client_gives_the_routers_answers_without_the_router(fleet: FleetThread) -> None:
    tensor = grpcclient.InferInput("INPUT", [3], "FP32")
    tensor.set_data_from_numpy(X)
    secret = fleet.fleet.fleet_secret
    with (
        Client(fleet.address, tenant="beta", fleet_secret=secret) as beta,
        Client(fleet.address, tenant="acme", fleet_secret=secret) as acme,
    ):
        assert beta.wait_synced() and acme.wait_synced()
        assert factor_seen(beta.infer("m", [tensor])) == 2.0
        assert factor_seen(acme.infer("m", [tensor])) == 1.0
        assert factor_seen(acme.infer("m", [tensor], model_version="3")) == 3.0
        ids = [f"r{i}" for i in range(20)]
        assert [factor_seen(beta.infer("s", [tensor], request_id=i)) for i in ids] == [
            call(fleet.address, "s", request_id=i) for i in ids
        ]
        assert beta.router_calls == 0 and acme.router_calls == 0
        assert beta.direct_calls == 21 and acme.direct_calls == 2
        with pytest.raises(InferenceServerException) as caught:
            beta.infer("m", [tensor], model_version="3")  # not visible to beta: the router says why
        assert caught.value.status() == "StatusCode.NOT_FOUND" and beta.router_calls == 1


def test_zero_hop_client_without_the_fleet_secret_calls_through_the_router(fleet: FleetThread) -> None:
    tensor = grpcclient.InferInput("INPUT", [3], "FP32")
    tensor.set_data_from_numpy(X)
    with Client(fleet.address, tenant="acme") as acme:
        assert acme.wait_synced()
        assert factor_seen(acme.infer("m", [tensor], model_version="3")) == 3.0
        assert acme.router_calls == 1 and acme.direct_calls == 0  # no addresses without the permission


def test_zero_hop_client_without_a_table_uses_the_router(fleet: FleetThread) -> None:
    """Before its first table (or once the watch has been down too long) every call goes to the router.

    A live watch cannot be made to lag on demand, so the test clears the flag the first table sets.
    """
    tensor = grpcclient.InferInput("INPUT", [3], "FP32")
    tensor.set_data_from_numpy(X)
    with Client(fleet.address, tenant="beta", fleet_secret=fleet.fleet.fleet_secret) as client:
        assert client.wait_synced()
        client._synced.clear()
        assert client.stale
        assert factor_seen(client.infer("m", [tensor])) == 2.0
        assert client.router_calls == 1 and client.direct_calls == 0
