"""The placement controller against a real store (embedded and etcd), without containers.

It is the one writer of the shard map: it places new and wanted models incrementally, leads alone among
several, and survives bad values in the store."""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from collections.abc import Callable

import pytest

from modelyard.placement import controller as controller_module
from modelyard.placement import registry
from modelyard.placement.controller import PlacementController, incremental_changes
from modelyard.placement.follow import StoreFollower
from modelyard.placement.mapwriter import MapWriter, RebalanceInProgress
from modelyard.placement.model import Container, CopyState, ModelVersion
from modelyard.placement.registry import Fleet
from modelyard.placement.store import Store, open_store

GiB = 1024**3


def run(url: str, scenario) -> object:  # type: ignore[no-untyped-def]
    async def main() -> object:
        async with open_store(url) as store:
            return await scenario(store)

    return asyncio.run(main())


async def until(follower: StoreFollower, condition: Callable[[Fleet], bool], timeout_s: float = 20) -> None:
    """Waits on the follower's change events until `condition(fleet)` holds."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while True:
        seen = follower.version
        if follower.loaded.is_set() and condition(follower.fleet):
            return
        left = deadline - loop.time()
        assert left > 0, "condition not reached"
        await follower.wait_changed(left, seen)


async def controller_task(store: Store, **options: object) -> tuple[PlacementController, asyncio.Task[None]]:
    controller = PlacementController(store, debounce_s=0.05, **options)  # type: ignore[arg-type]
    task = asyncio.create_task(controller.run())
    await asyncio.wait_for(controller.leading.wait(), 20)
    return controller, task


async def stop(*tasks: asyncio.Task[None]) -> None:
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


def test_registered_models_are_placed_within_budget_and_removed_ones_unassigned(store_url: str) -> None:
    async def scenario(store: Store) -> None:
        for cid in ("a", "b"):
            await registry.register_container(store, Container(cid, f"x:{cid}", memory_bytes=10 * GiB))
        _, task = await controller_task(store)
        watch = StoreFollower(store, name="test")
        watch.start()
        try:
            models = [ModelVersion(f"m{i}", "1", memory_bytes=GiB) for i in range(12)]
            for model in models:
                await registry.register_model(store, model)
            await until(watch, lambda f: all(m.key in f.assignments for m in models))
            fleet = watch.fleet
            per_container = {cid: len(fleet.by_container.get(cid, ())) for cid in ("a", "b")}
            assert sum(per_container.values()) == 12 and max(per_container.values()) <= 10
            await store.delete(registry.MODELS + models[0].key)
            await until(watch, lambda f: models[0].key not in f.assignments)
        finally:
            await stop(task)
            await watch.stop()

    run(store_url, scenario)


def test_a_bulk_registration_is_placed_in_slices_each_committed_with_wanted_models_first(
    store_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A pass's copies reach agents only when its generation commits: a bulk import is placed a slice at a
    time (agents load the first slice while the next is written), a model a call waits for in the first."""
    monkeypatch.setattr(controller_module, "INCREMENTAL_SLICE", 50)

    async def scenario(store: Store) -> None:
        for cid in ("a", "b"):
            await registry.register_container(store, Container(cid, f"x:{cid}", memory_bytes=1000 * GiB))
        controller, task = await controller_task(store, retry_s=0.2)
        watch = StoreFollower(store, name="test")
        watch.start()
        # Another process's rebalance holds the map: the controller gathers all 230 models (and the wait
        # for one of them) before it may place any, whichever batches the store delivered them in.
        other = MapWriter(store, watch, "someone-else")
        try:
            await until(watch, lambda f: f.generation >= 1)  # the leader's first full pass is behind us
            models = [ModelVersion(f"m{i:03d}", "1", memory_bytes=GiB) for i in range(230)]
            waited_for = models[177].key
            deadline = asyncio.get_running_loop().time() + 20
            while True:
                try:
                    async with other.locked():
                        await registry.create_models(store, models)  # as `models import` writes them
                        await registry.want_model(store, waited_for)
                        await until(
                            controller.follower, lambda f: waited_for in f.wanted and len(f.models) == 230
                        )
                    break
                except RebalanceInProgress:  # the controller's own pass holds it: try again
                    assert asyncio.get_running_loop().time() < deadline, (
                        "the map lock never came free in 20 s"
                    )
                    await asyncio.sleep(0.05)
            await until(watch, lambda f: all(m.key in f.assignments for m in models))
            placed_in = Counter(watch.fleet.raw_assignments[m.key].gen for m in models)
            assert max(placed_in.values()) <= 50 and len(placed_in) >= 5, placed_in
            assert watch.fleet.raw_assignments[waited_for].gen == min(placed_in), placed_in
        finally:
            await stop(task)
            await watch.stop()

    run(store_url, scenario)


def test_a_wanted_model_is_placed_by_a_lazy_controller_and_the_request_answered(store_url: str) -> None:
    async def scenario(store: Store) -> None:
        await registry.register_container(store, Container("a", "x:a", memory_bytes=4 * GiB))
        _, task = await controller_task(store, eager=False)
        watch = StoreFollower(store, name="test")
        watch.start()
        try:
            small, huge = (
                ModelVersion("small", "1", memory_bytes=GiB),
                ModelVersion("huge", "1", memory_bytes=64 * GiB),
            )
            await registry.register_model(store, small)
            await registry.register_model(store, huge)
            await until(watch, lambda f: huge.key in f.models)
            assert small.key not in watch.fleet.assignments  # lazy: nothing placed before it is wanted
            await registry.want_model(store, small.key)
            await registry.want_model(store, huge.key)
            await until(watch, lambda f: small.key in f.assignments)
            await until(watch, lambda f: bool(f.wanted.get(huge.key)))
            # The request stays while the copy loads (agents load wanted models first), and goes once ready.
            assert watch.fleet.wanted.get(small.key) == ""
            (cid,) = watch.fleet.assignments[small.key]
            await registry.put_copy_state(store, cid, small.key, CopyState("ready"))  # as its agent would
            await until(watch, lambda f: small.key not in f.wanted)
            assert f"has {64 * GiB} bytes free" in watch.fleet.wanted[huge.key]
            assert huge.key not in watch.fleet.assignments
        finally:
            await stop(task)
            await watch.stop()

    run(store_url, scenario)


def test_copies_of_a_dead_container_are_re_placed_incrementally() -> None:
    models = [ModelVersion(f"m{i}", "1", memory_bytes=GiB, replicas=2) for i in range(4)]
    containers = [Container(c, f"x:{c}", memory_bytes=8 * GiB) for c in ("a", "b", "c")]
    fleet = Fleet.of(models=models, containers=containers, assignments={m.key: ("a", "dead") for m in models})
    changes, unplaced = incremental_changes(fleet, fleet.by_container["dead"])
    assert unplaced == {}
    for m in models:
        new = changes[m.key]
        assert new[0] == "a" and new[1] in ("b", "c") and "dead" not in new
    # Nowhere to go: the lost copy stays assigned (its container may come back) and the reason is given.
    tight = Fleet.of(
        models=[ModelVersion("m", "1", memory_bytes=GiB, replicas=2)],
        containers=[Container("a", "x:a", memory_bytes=8 * GiB)],
        assignments={"m@1": ("a", "dead")},
    )
    changes, unplaced = incremental_changes(tight, ["m@1"])
    assert changes == {} and "m@1" in unplaced


def test_a_model_whose_registration_turns_unreadable_keeps_its_copies() -> None:
    """A bad write over a registered model's key (or a newer writer's format) must not read as "removed":
    a controller that starts from a snapshot then would drop the copies and fail every call to it."""
    from modelyard.placement.rebalance import plan_rebalance
    from modelyard.placement.store import Event

    kept = ModelVersion("kept", "1", memory_bytes=GiB)
    other = ModelVersion("other", "1", memory_bytes=GiB)
    fleet = Fleet.of(
        models=[kept, other],
        containers=[Container("a", "x:a", memory_bytes=8 * GiB)],
        assignments={kept.key: ("a",), other.key: ("a",)},
    )
    # A snapshot taken now (as a fresh reader sees the store): kept@1 holds garbage, other@1 is deleted.
    fresh = Fleet.of(
        containers=[Container("a", "x:a", memory_bytes=8 * GiB)], assignments=dict(fleet.assignments)
    )
    fresh.apply(Event("put", registry.MODELS + kept.key, b'{"name": "kept", "version": 1}', 99))
    assert kept.key not in fresh.models and registry.MODELS + kept.key in fresh.unparsable
    changes, _ = incremental_changes(fresh, [kept.key, other.key])
    assert changes == {other.key: ()}  # the removed one loses its copy; the unreadable one keeps it
    proposal = plan_rebalance(fresh)
    assert proposal.after.get(kept.key) == ("a",) and not proposal.after.get(other.key)
    # A good value again: no longer unparsable.
    fresh.apply(Event("put", registry.MODELS + kept.key, kept.to_json(), 100))
    assert kept.key in fresh.models and not fresh.unparsable


def test_of_two_controllers_one_leads_and_the_other_takes_over_when_it_goes(store_url: str) -> None:
    async def scenario(store: Store) -> None:
        _, first_task = await controller_task(store, lease_ttl_s=2.0)
        second = PlacementController(store, debounce_s=0.05, lease_ttl_s=2.0)
        second_task = asyncio.create_task(second.run())
        try:
            await asyncio.sleep(0)  # let the second campaign start
            with pytest.raises(TimeoutError):
                await asyncio.wait_for(second.leading.wait(), 1.0)  # the first one leads
            await stop(first_task)  # revokes its lease: the leader key goes with it
            await asyncio.wait_for(second.leading.wait(), 10)
            assert (await store.get(registry.LEADER)).value.decode() == second.holder  # type: ignore[union-attr]
        finally:
            await stop(first_task, second_task)

    run(store_url, scenario)


def test_bad_values_in_the_store_are_skipped_with_a_log_line_and_stop_nothing(
    store_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    async def scenario(store: Store) -> None:
        await registry.register_container(store, Container("a", "x:a", memory_bytes=4 * GiB))
        controller, task = await controller_task(store)
        watch = StoreFollower(store, name="test")
        watch.start()
        try:
            await store.put(registry.CONTAINERS + "broken", b"null")
            await store.put(
                registry.MODELS + "typed@1", b'{"name": "typed", "version": "1", "memory_bytes": "x"}'
            )
            await store.put(registry.MODELS + "garbage@1", b"{not json")
            await store.put(registry.ROUTES + "m", b'{"model": "m", "weights": [["1", "heavy"]]}')
            await store.put(registry.ASSIGN + "x@1", b'{"ids": "a"}')
            good = ModelVersion("good", "1", memory_bytes=GiB)
            await registry.register_model(store, good)
            # The follower and the controller go on: the good model is placed after the bad values.
            await until(watch, lambda f: good.key in f.assignments)
            fleet = watch.fleet
            assert "broken" not in fleet.containers and "typed@1" not in fleet.models
            assert "garbage@1" not in fleet.models and "m" not in fleet.routes
            assert watch.healthy and fleet.skipped == 5
            assert not task.done()
            assert controller.follower.healthy
        finally:
            await stop(task)
            await watch.stop()
        skipped = [r.getMessage() for r in caplog.records if "skipped" in r.getMessage()]
        for key in ("containers/broken", "models/typed@1", "models/garbage@1", "routes/m", "assign/x@1"):
            assert any(key in line for line in skipped), key

    with caplog.at_level(logging.WARNING):
        run(store_url, scenario)


def test_a_new_leader_places_at_once_in_a_store_where_nothing_else_moves(store_url: str) -> None:
    """A new term's first write only moves the generation (the fence): the controller waits to see it
    before placing, so the follower must announce a generation-only change. It once did not: in a store
    with no other writes (no agents, no routers) the first placement waited 30 s for an unrelated event."""

    async def scenario(store: Store) -> None:
        await registry.register_container(store, Container("x", "h:1", memory_bytes=8 * GiB))
        await registry.register_model(store, ModelVersion("a", "1", memory_bytes=GiB))
        controller, task = await controller_task(store)
        try:
            await until(
                controller.follower, lambda fleet: fleet.assignments.get("a@1") == ("x",), timeout_s=5
            )
            assert controller.follower.fleet.generation == 2  # the fence, then the placement
        finally:
            await stop(task)

    run(store_url, scenario)
