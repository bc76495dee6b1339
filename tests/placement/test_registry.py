"""The shard map in the store: compare-and-swap generations, incremental writes, typed reads."""

from __future__ import annotations

import asyncio
import dataclasses
import json

import pytest

from modelyard.placement import registry
from modelyard.placement.model import Container, CopyState, ModelVersion, RouteRule, signature_json
from modelyard.placement.registry import ConcurrentPlanError
from modelyard.placement.store import Store, open_store
from modelyard.placement.tenants import TenantLimits


def run(url: str, scenario) -> object:  # type: ignore[no-untyped-def]
    async def main() -> object:
        async with open_store(url) as store:
            return await scenario(store)

    return asyncio.run(main())


def test_shard_map_round_trips_with_every_type(store_url: str) -> None:
    async def scenario(store: Store) -> None:
        model = ModelVersion("m", "1", memory_bytes=5, replicas=2, tenants=("t1",))
        container = Container("c1", "127.0.0.1:9", kind="gpu", memory_bytes=80)
        await registry.register_model(store, model)
        await registry.register_container(store, container)
        generation = await registry.write_shard_map(store, {model.key: ["c1"]}, expected_generation=0)
        await registry.put_copy_state(store, "c1", model.key, CopyState("failed", message="boom"))
        fleet = await registry.load_fleet(store)
        assert generation == 1 and fleet.generation == 1
        assert fleet.models == {model.key: model}
        assert fleet.containers == {"c1": container}
        assert fleet.assignments == {model.key: ("c1",)}
        assert fleet.states == {("c1", model.key): CopyState("failed", message="boom")}
        assert fleet.copies_on("c1") == [model.key]

    run(store_url, scenario)


def test_stored_values_keep_their_canonical_spelling() -> None:
    """Every field, keys sorted, tuples as lists: the bytes fleets already hold in their store. A value
    re-encoded differently would look changed to every comparison of stored bytes (and be rewritten)."""
    signature = signature_json((("IN", "FP32", (-1, 3)),), (("OUT", "FP32", (-1,)),), False)
    values = [
        ModelVersion(
            "m", "7", backend="custom", kind="gpu", memory_bytes=5, replicas=0, artifact_uri="file:///a/b",
            sha256="ab" * 32, tenants=("t1", "t\u00e9"), max_replicas=3, signature=signature,
        ),
        Container("c1", "127.0.0.1:9", kind="gpu", memory_bytes=80, backend="custom", labels=(("zone", "a"),),
                  max_inflight=4),
        CopyState("failed", message="boom \"quoted\"", measured_bytes=7, container_full=True),
        RouteRule("m", default_version="7", tenant_versions=(("t1", "7"),), weights=(("7", 3), ("6", 1))),
        TenantLimits(max_inflight=3, rps=2.5, burst=4, priority="high"),
    ]  # fmt: skip
    for value in values:
        assert value.to_json() == json.dumps(dataclasses.asdict(value), sort_keys=True).encode()
        assert type(value).from_json(value.to_json()) == value


def test_a_stale_generation_is_refused_and_writes_nothing(store_url: str) -> None:
    async def scenario(store: Store) -> None:
        await registry.write_shard_map(store, {"a@1": ["c1"]}, expected_generation=0)
        with pytest.raises(ConcurrentPlanError):
            await registry.write_shard_map(store, {"b@1": ["c2"]}, expected_generation=0)
        fleet = await registry.load_fleet(store)
        assert fleet.assignments == {"a@1": ("c1",)} and fleet.generation == 1

    run(store_url, scenario)


def test_concurrent_planners_exactly_one_wins(store_url: str) -> None:
    async def scenario(store: Store) -> None:
        plans = [{f"m{i}@1": [f"c{i}"]} for i in range(4)]
        results = await asyncio.gather(
            *(registry.write_shard_map(store, p, expected_generation=0) for p in plans),
            return_exceptions=True,
        )
        winners = [r for r in results if not isinstance(r, Exception)]
        assert winners == [1]
        assert all(isinstance(r, ConcurrentPlanError) for r in results if isinstance(r, Exception))
        fleet = await registry.load_fleet(store)
        assert len(fleet.assignments) == 1

    run(store_url, scenario)


def test_rewrite_touches_only_changed_assignments(store_url: str) -> None:
    async def scenario(store: Store) -> None:
        first = {f"m{i}@1": [f"c{i % 3}"] for i in range(250)}
        await registry.write_shard_map(store, first, expected_generation=0)
        before = {kv.key: kv.mod_revision for kv in (await store.get_prefix(registry.ASSIGN))[0]}
        second = dict(first)
        second["m0@1"] = ["c2"]
        del second["m1@1"]
        await registry.write_shard_map(store, second, expected_generation=1)
        after = {kv.key: kv.mod_revision for kv in (await store.get_prefix(registry.ASSIGN))[0]}
        changed = {k for k in after if after[k] != before.get(k)}
        # m1 is unassigned by a tombstone value (readers of the staged generation still need its old ids)
        assert changed == {registry.ASSIGN + "m0@1", registry.ASSIGN + "m1@1"}
        value = await store.get(registry.ASSIGN + "m0@1")
        assert value is not None and json.loads(value.value)["ids"] == ["c2"]
        fleet = await registry.load_fleet(store)
        assert "m1@1" not in fleet.assignments and fleet.assignments["m0@1"] == ("c2",)

    run(store_url, scenario)
