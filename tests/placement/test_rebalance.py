"""Rebalancing against the store: lost copies, the rebalance lock, make-before-break, big maps."""

from __future__ import annotations

import asyncio
import time

import pytest

from modelyard.placement import registry
from modelyard.placement.model import Container, CopyState, ModelVersion
from modelyard.placement.rebalance import RebalanceInProgress, apply_rebalance, plan_rebalance
from modelyard.placement.registry import Fleet
from modelyard.placement.store import Store, open_store
from modelyard.placement.usage import lost_copies, under_replicated, usage

GiB = 1024**3


def run(url: str, scenario) -> object:  # type: ignore[no-untyped-def]
    async def main() -> object:
        async with open_store(url) as store:
            return await scenario(store)

    return asyncio.run(main())


async def seed(store: Store, models: list[ModelVersion], containers: list[Container], assignments) -> None:  # type: ignore[no-untyped-def]
    for model in models:
        await registry.register_model(store, model)
    for container in containers:
        await registry.register_container(store, container)
    await registry.write_shard_map(store, assignments, expected_generation=0)


def test_copies_on_a_container_whose_lease_expired_are_lost_and_replanned(store_url: str) -> None:
    async def scenario(store: Store) -> None:
        models = [ModelVersion(f"m{i}", "1", memory_bytes=GiB, replicas=1) for i in range(4)]
        await seed(store, models, [Container("a", "x:1", memory_bytes=8 * GiB)], {})
        lease = await store.grant_lease(1)
        await registry.register_container(store, Container("b", "x:2", memory_bytes=8 * GiB), lease)
        first = plan_rebalance(await registry.load_fleet(store))
        await registry.write_shard_map(store, first.after, expected_generation=first.generation)
        on_b = {k for k, ids in first.after.items() if "b" in ids}
        assert on_b, "the planner should use both containers"

        deadline = time.monotonic() + 10
        while (fleet := await registry.load_fleet(store)).containers.keys() != {"a"}:
            assert time.monotonic() < deadline, "lease did not expire"
            await asyncio.sleep(0.2)
        assert lost_copies(fleet) == sorted((k, "b") for k in on_b)
        assert set(under_replicated(fleet)) == on_b

        again = plan_rebalance(fleet)
        assert all(ids == ("a",) for ids in again.after.values()) and len(again.after) == 4
        moved = {m.model for m in again.moves}
        assert moved == on_b  # exactly the lost copies move
        assert all(m.source == "b" and m.target == "a" for m in again.moves)

    run(store_url, scenario)


def test_replanning_an_unchanged_fleet_moves_nothing() -> None:
    models = [ModelVersion(f"m{i}", "1", memory_bytes=GiB) for i in range(20)]
    containers = [Container(c, "x", memory_bytes=16 * GiB) for c in ("a", "b", "c")]
    first = plan_rebalance(Fleet.of(models=models, containers=containers))
    second = plan_rebalance(Fleet.of(models=models, containers=containers, assignments=first.after))
    assert second.moves == [] and second.after == first.after


def test_usage_budgets_with_measured_memory_when_it_exceeds_the_declared() -> None:
    fleet = Fleet.of(
        models=[ModelVersion("m", "1", memory_bytes=100)],
        containers=[Container("a", "x", memory_bytes=1000)],
        states={("a", "m@1"): CopyState("ready", measured_bytes=400)},
    )
    assert usage(fleet, {"m@1": ("a",)})[0].used_bytes == 400


def test_two_concurrent_rebalances_exactly_one_applies_and_unready_moves_keep_old_copies(
    store_url: str,
) -> None:
    async def scenario(store: Store) -> None:
        models = [ModelVersion(f"m{i}", "1", memory_bytes=GiB) for i in range(6)]
        await seed(
            store, models, [Container("a", "x:1", memory_bytes=16 * GiB)], {m.key: ["a"] for m in models}
        )
        await registry.register_container(store, Container("b", "x:2", memory_bytes=16 * GiB))
        plan = plan_rebalance(await registry.load_fleet(store))
        assert any(m.target == "b" for m in plan.moves), "a new empty container should adopt copies"

        # No agent runs for "b", so its copies never become ready: the first rebalance waits for them.
        first = asyncio.create_task(apply_rebalance(store, plan, holder="first", ready_timeout_s=2))
        while await store.get("/modelyard/lock/rebalance") is None:  # the first holds the lock
            assert not first.done(), first
            await asyncio.sleep(0.01)
        with pytest.raises(RebalanceInProgress, match="held by first"):
            await apply_rebalance(store, plan, holder="second", ready_timeout_s=2)
        result = await first
        assert set(result.failed) == {(m.model, "b") for m in plan.moves if m.target == "b"}
        fleet = await registry.load_fleet(store)
        # Nothing is lost: every model still has its copy on "a", and no unready copy stays assigned.
        assert fleet.assignments == {m.key: ("a",) for m in models}
        assert fleet.generation == plan.generation + 2
        assert await store.get("/modelyard/lock/rebalance") is None

    run(store_url, scenario)


def test_a_rebalance_waits_for_new_copies_before_dropping_old_ones(store_url: str) -> None:
    async def scenario(store: Store) -> None:
        models = [ModelVersion(f"m{i}", "1", memory_bytes=GiB) for i in range(6)]
        await seed(
            store, models, [Container("a", "x:1", memory_bytes=16 * GiB)], {m.key: ["a"] for m in models}
        )
        await registry.register_container(store, Container("b", "x:2", memory_bytes=16 * GiB))
        plan = plan_rebalance(await registry.load_fleet(store))
        targets = [(m.model, m.target) for m in plan.moves if m.target == "b"]
        assert targets
        observed_during: list[dict[str, tuple[str, ...]]] = []

        async def agent_for_b() -> None:
            """Reports each copy assigned to b ready: the protocol under test, without a container process.

            tests/test_rebalance_e2e.py runs the same move with real agents and Triton containers.
            """
            while True:
                fleet = await registry.load_fleet(store)
                assigned = [k for k in fleet.copies_on("b") if ("b", k) not in fleet.states]
                if assigned:
                    observed_during.append(dict(fleet.assignments))
                for key in assigned:
                    await registry.put_copy_state(store, "b", key, CopyState("ready"))
                await asyncio.sleep(0.05)

        helper = asyncio.create_task(agent_for_b())
        try:
            result = await apply_rebalance(store, plan, holder="t", ready_timeout_s=20)
        finally:
            helper.cancel()
        assert result.failed == {} and result.ready == len(targets)
        # While b was loading, each moving model was assigned to both containers (make-before-break).
        for key, _ in targets:
            assert set(observed_during[0][key]) == {"a", "b"}
        fleet = await registry.load_fleet(store)
        assert fleet.assignments == plan.after

    run(store_url, scenario)


def test_a_20k_model_map_round_trips_through_the_store(store_url: str) -> None:
    count = 20_000

    async def scenario(store: Store) -> None:
        assignments = {f"model-{i:05d}@1": [f"c{i % 97}", f"c{(i + 1) % 97}"] for i in range(count)}
        await registry.write_shard_map(store, assignments, expected_generation=0)
        fleet = await registry.load_fleet(store)
        assert fleet.generation == 1
        assert fleet.assignments == {k: tuple(v) for k, v in assignments.items()}

    run(store_url, scenario)


def test_lost_copies_with_nowhere_to_go_stay_assigned() -> None:
    fleet = Fleet.of(
        models=[ModelVersion("m", "1", memory_bytes=GiB, replicas=2)],
        containers=[Container("a", "x", memory_bytes=4 * GiB)],
        assignments={"m@1": ("a", "dead")},
    )
    proposal = plan_rebalance(fleet)
    assert proposal.after == {"m@1": ("a", "dead")}
    assert proposal.moves == []


def test_models_only_go_to_containers_of_their_backend() -> None:
    fleet = Fleet.of(
        models=[
            ModelVersion("t", "1", backend="triton", memory_bytes=GiB),
            ModelVersion("n", "1", backend="custom", memory_bytes=GiB),
            ModelVersion("big", "1", backend="custom", memory_bytes=10 * GiB),
        ],
        containers=[
            Container("tri", "x", memory_bytes=64 * GiB, backend="triton"),
            Container("own", "y", memory_bytes=4 * GiB, backend="custom"),
        ],
    )
    proposal = plan_rebalance(fleet)
    assert proposal.after == {"t@1": ("tri",), "n@1": ("own",)}
    assert "among custom containers" in proposal.unplaced["big@1"]
