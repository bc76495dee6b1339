"""Tenant limits end to end: the `tenants` commands, a router following them, refusals before upstream."""

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
from tritonclient.grpc import service_pb2 as kserve

from modelyard.fleet_secret import FLEET_SECRET_HEADER
from modelyard.placement import registry
from modelyard.placement.store import open_store
from modelyard.placement.tenants import TenantLimits
from modelyard.router.admission import PUSHBACK_TRAILER
from modelyard.v1 import router_pb2, router_pb2_grpc
from tests.fleet import FleetThread, start_custom_fleet
from tests.test_lazy_load import scale_model

INFER = "/inference.GRPCInferenceService/ModelInfer"
STREAM_INFER = "/inference.GRPCInferenceService/ModelStreamInfer"
STATISTICS = "/inference.GRPCInferenceService/ModelStatistics"


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "modelyard", "tenants", *args], capture_output=True, text=True, timeout=60
    )


async def tenant_keys(store_url: str) -> list[str]:
    async with open_store(store_url) as store:
        items, _ = await store.get_prefix(registry.TENANTS)
        default = await store.get(registry.TENANT_DEFAULT)
    return [item.key for item in items] + ([default.key] if default else [])


# -- the commands --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "args",
    [
        ["set", "noisy", "--max-inflight", "0"],
        ["set", "noisy", "--max-inflight", "-2"],
        ["set", "noisy", "--rps", "fast"],
        ["set", "noisy", "--burst", "0"],
        ["set", "noisy", "--priority", "urgent"],
        ["set", "noisy"],
        ["set", "--max-inflight", "2"],
        ["set", "a/b", "--max-inflight", "2"],
    ],
)
def test_bad_tenants_set_input_is_refused_with_one_line_and_nothing_is_written(
    tmp_path: Path, args: list[str]
) -> None:
    store_url = str(tmp_path / "store")
    done = cli(*args, "--store", store_url)
    assert done.returncode == 2, done.stderr
    assert len(done.stderr.strip().splitlines()) == 1 and done.stderr.startswith("error: "), done.stderr
    assert asyncio.run(tenant_keys(store_url)) == []


def test_tenants_set_show_list_and_clear(tmp_path: Path) -> None:
    store = ["--store", str(tmp_path / "store")]
    assert cli("set", "noisy", "--max-inflight", "4", "--rps", "50", *store).returncode == 0
    assert cli("set", "noisy", "--priority", "low", *store).returncode == 0  # the others stay
    assert cli("set", "--default", "--max-inflight", "8", *store).returncode == 0
    shown = json.loads(cli("show", "noisy", "-o", "json", *store).stdout)
    assert shown["limits"] == {"max_inflight": 4, "rps": 50.0, "priority": "low"}
    assert shown["source"] == "entry" and shown["live_routers"] == 0
    assert json.loads(cli("show", "other", "-o", "json", *store).stdout)["source"] == "default"
    rows = json.loads(cli("list", "-o", "json", *store).stdout)
    assert [r["tenant"] for r in rows] == ["noisy", "(default)"]
    assert cli("clear", "noisy", *store).returncode == 0
    missing = cli("clear", "noisy", *store)
    assert missing.returncode == 2 and missing.stderr == "error: noisy has no limits\n"
    assert json.loads(cli("show", "noisy", "-o", "json", *store).stdout)["limits"] == {
        "max_inflight": 8,
        "priority": "normal",
    }


def test_tenants_show_and_list_follow_the_cli_conventions(tmp_path: Path) -> None:
    """-o table|json|yaml like every list and show; a store path that does not exist is refused, not made."""
    import yaml

    store = ["--store", str(tmp_path / "store")]
    assert cli("set", "noisy", "--max-inflight", "4", *store).returncode == 0
    assert yaml.safe_load(cli("show", "noisy", "-o", "yaml", *store).stdout)["limits"] == {
        "max_inflight": 4,
        "priority": "normal",
    }
    table = cli("list", *store).stdout.splitlines()  # piped: plain columns
    assert table[0].split() == ["tenant", "limits", "source", "per", "router"] and table[1].startswith(
        "noisy"
    )
    for command in ("show", "list"):
        absent = cli(command, *(["noisy"] if command == "show" else []), "--store", str(tmp_path / "typo"))
        assert absent.returncode == 2 and "no store at" in absent.stderr, absent.stderr
    assert not (tmp_path / "typo").exists()


# -- a router following them ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FleetThread]:
    """One of our containers with model m (x2), the router, the controller."""
    root = tmp_path_factory.mktemp("limits")
    thread = start_custom_fleet(root / "fleet", [scale_model(root / "models", "m", 2.0)])
    yield thread
    thread.stop()


def request() -> bytes:
    message = kserve.ModelInferRequest(model_name="m")
    tensor = message.inputs.add(name="INPUT", datatype="FP32", shape=[3])
    message.raw_input_contents.append(np.array([1.0, 2.0, 3.0], dtype=np.float32).tobytes())
    assert tensor.name == "INPUT"
    return bytes(message.SerializeToString())


def set_limits(fleet: FleetThread, tenant: str, limits: TenantLimits | None) -> None:
    """Writes `tenant`'s limits to the store and waits until the router has them (on its follower)."""
    router = fleet.fleet.router
    assert router is not None

    async def write() -> None:
        store = fleet.fleet.store
        key = registry.tenant_key(tenant)
        if limits is None:
            await store.delete(key)
        else:
            await registry.put_tenant_limits(store, tenant, limits, await store.get(key))
        follower = router.router.follower
        async with asyncio.timeout(5):
            while router.router.admission.fleet_limits.get(tenant) != limits:
                await follower.wait_changed(5, follower.version)

    fleet.call(write())


def inference_count(fleet: FleetThread) -> int:
    """Calls our container has run for m (asked of the container itself, with the fleet secret)."""
    address = fleet.fleet.customs[0].address
    with grpc.insecure_channel(address) as channel:
        answer = channel.unary_unary(STATISTICS)(
            kserve.ModelStatisticsRequest(name="m").SerializeToString(),
            metadata=((FLEET_SECRET_HEADER, fleet.fleet.fleet_secret),),
            timeout=10,
        )
    stats = kserve.ModelStatisticsResponse.FromString(answer).model_stats
    return sum(s.inference_stats.success.count for s in stats)


def test_a_limit_set_with_the_cli_reaches_the_router_within_a_second(fleet: FleetThread) -> None:
    router = fleet.fleet.router
    assert router is not None
    admission = router.router.admission
    started = time.monotonic()
    done = cli("set", "cli-tenant", "--max-inflight", "3", "--store", fleet.fleet.store_url)
    written = time.monotonic()
    assert done.returncode == 0, done.stderr

    async def seen() -> float:
        follower = router.router.follower
        async with asyncio.timeout(5):
            while admission.fleet_limits.get("cli-tenant") != TenantLimits(max_inflight=3):
                await follower.wait_changed(5, follower.version)
        return time.monotonic()

    assert fleet.call(seen()) - written < 1.0, f"the command itself took {written - started:.2f} s"
    assert admission.limits_of("cli-tenant").max_inflight == 3
    set_limits(fleet, "cli-tenant", None)


def test_calls_over_the_in_flight_limit_are_refused_before_the_container_with_a_pushback(
    fleet: FleetThread,
) -> None:
    """An open stream holds noisy's one call in flight: its unary call is refused, the container never
    sees it, and the refusal carries the push-back trailer."""
    set_limits(fleet, "noisy", TenantLimits(max_inflight=1))
    noisy = (("x-tenant-id", "noisy"),)
    with grpc.insecure_channel(fleet.address) as channel:
        sent: queue.Queue[bytes | None] = queue.Queue()
        stream = channel.stream_stream(STREAM_INFER)(iter(sent.get, None), metadata=noisy, timeout=30)
        try:
            sent.put(request())
            first = kserve.ModelStreamInferResponse.FromString(next(stream))
            assert not first.error_message  # the stream is open and admitted
            before = inference_count(fleet)
            started = time.monotonic()
            with pytest.raises(grpc.RpcError) as refused:
                channel.unary_unary(INFER)(request(), metadata=noisy, timeout=10)
            took_s = time.monotonic() - started
            error = refused.value
            assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED  # type: ignore[attr-defined]
            assert "limit of 1 calls in flight" in error.details()  # type: ignore[attr-defined]
            trailers = dict(error.trailing_metadata())  # type: ignore[attr-defined]
            assert int(trailers[PUSHBACK_TRAILER]) >= 1
            assert took_s < 1.0
            assert inference_count(fleet) == before  # refused before any upstream work
            # another tenant is not held back by noisy's limit
            channel.unary_unary(INFER)(request(), metadata=(("x-tenant-id", "quiet"),), timeout=10)
        finally:
            sent.put(None)
            for _ in stream:
                pass
        # the stream closed: noisy's slot is free again
        channel.unary_unary(INFER)(request(), metadata=noisy, timeout=10)
    set_limits(fleet, "noisy", None)


def test_calls_over_the_rate_limit_are_refused_with_the_time_to_the_next_token(fleet: FleetThread) -> None:
    set_limits(fleet, "rated", TenantLimits(rps=0.5, burst=1))
    rated = (("x-tenant-id", "rated"),)
    with grpc.insecure_channel(fleet.address) as channel:
        channel.unary_unary(INFER)(request(), metadata=rated, timeout=10)
        before = inference_count(fleet)
        with pytest.raises(grpc.RpcError) as refused:
            channel.unary_unary(INFER)(request(), metadata=rated, timeout=10)
    error = refused.value
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED  # type: ignore[attr-defined]
    assert "rate limit of 0.5 calls/s" in error.details()  # type: ignore[attr-defined]
    assert 1 <= int(dict(error.trailing_metadata())[PUSHBACK_TRAILER]) <= 2000  # type: ignore[attr-defined]
    assert inference_count(fleet) == before
    set_limits(fleet, "rated", None)


def test_zero_hop_clients_of_a_limited_tenant_read_no_container_addresses(fleet: FleetThread) -> None:
    def addresses(tenant: str) -> list[str]:
        metadata = (("x-tenant-id", tenant), (FLEET_SECRET_HEADER, fleet.fleet.fleet_secret))
        with grpc.insecure_channel(fleet.address) as channel:
            answer = router_pb2_grpc.RouterStub(channel).WhereIs(
                router_pb2.WhereIsRequest(model_name="m"), metadata=metadata, timeout=10
            )
        return [c.address for loc in answer.locations for c in loc.copies]

    assert addresses("limited") == [fleet.fleet.customs[0].address]
    set_limits(fleet, "limited", TenantLimits(rps=100))
    assert addresses("limited") == [""]  # its calls go through the router, and its limits
    assert addresses("free") == [fleet.fleet.customs[0].address]
    set_limits(fleet, "limited", None)


def test_the_router_is_counted_among_live_routers_in_the_store(fleet: FleetThread) -> None:
    router = fleet.fleet.router
    assert router is not None

    async def routers() -> int:
        follower = router.router.follower
        async with asyncio.timeout(10):
            while not follower.fleet.routers:
                await follower.wait_changed(10, follower.version)
        return router.router.admission.routers

    assert fleet.call(routers()) == 1
    shown = json.loads(cli("show", "anyone", "-o", "json", "--store", fleet.fleet.store_url).stdout)
    assert shown["live_routers"] == 1


# -- a container at its bound ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def bounded(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FleetThread]:
    """One of our containers registered to run one call at a time, with model m."""
    root = tmp_path_factory.mktemp("bounded")
    thread = start_custom_fleet(root / "fleet", [scale_model(root / "models", "m", 2.0)], max_inflight=1)
    yield thread
    thread.stop()


def test_a_call_that_cannot_get_a_slot_before_its_deadline_is_refused_not_sent(bounded: FleetThread) -> None:
    """The container's one slot is taken (counted at the router as a running call is, and never given
    back here): a call waits in its tenant's queue and, its deadline coming, is refused RESOURCE_EXHAUSTED
    by the router — it never reaches the container, and does not time out there."""
    router = bounded.fleet.router
    assert router is not None
    assert router.router.queues.bounds == {"custom-0": 1}
    outstanding = router.router.channels.outstanding

    async def take_slot(n: int) -> None:
        outstanding["custom-0"] = outstanding.get("custom-0", 0) + n

    before = inference_count(bounded)
    bounded.call(take_slot(1))
    try:
        started = time.monotonic()
        with grpc.insecure_channel(bounded.address) as channel, pytest.raises(grpc.RpcError) as refused:
            channel.unary_unary(INFER)(request(), metadata=(("x-tenant-id", "b"),), timeout=0.5)
        took_s = time.monotonic() - started
    finally:
        bounded.call(take_slot(-1))
    error = refused.value
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, error.details()  # type: ignore[attr-defined]
    assert "at its bound of 1 calls in flight" in error.details()  # type: ignore[attr-defined]
    assert int(dict(error.trailing_metadata())[PUSHBACK_TRAILER]) >= 1  # type: ignore[attr-defined]
    assert took_s < 1.0  # it waited for a slot until just before its deadline (no wait measured yet)
    assert inference_count(bounded) == before
    assert router.router.admission.refused[("other", "deadline")] == 1
    assert router.router.queues.depth() == {}
    with grpc.insecure_channel(bounded.address) as channel:  # the slot given back: calls go through
        channel.unary_unary(INFER)(request(), metadata=(("x-tenant-id", "b"),), timeout=10)
    assert inference_count(bounded) == before + 1
