"""Copies follow load and memory as a cache: the policy's pure functions (placement/autoscale.py), and the
model fields it reads."""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from modelyard.placement.autoscale import (
    ModelLoad,
    Policy,
    Room,
    Timers,
    copies_to_place,
    kept_copies,
    make_room,
    plan_autoscale,
    scale_target,
)
from modelyard.placement.model import Container, ModelVersion
from modelyard.placement.rates import RATES, ModelRate, RateReport, read_rates, sum_reports
from modelyard.placement.rebalance import plan_rebalance
from modelyard.placement.registry import Fleet
from modelyard.placement.store import open_store
from modelyard.router.rates import RateCounter

GiB = 1024**3
POLICY = Policy(copy_target_rps=10, scale_down_after_s=30, scale_up_after_s=2, evict_idle_s=5)


def load(key: str = "m@1", *, copies: tuple[str, ...] = ("a",), rate: float = 0.0, **kw: object) -> ModelLoad:
    fields: dict[str, object] = {
        "backend": "custom",
        "kind": "cpu",
        "cost_bytes": GiB,
        "replicas": 1,
        "most_copies": 3,
        "ready": len(copies),
        "idle_s": 0.0 if rate else math.inf,
    }
    fields.update(kw)
    return ModelLoad(key, copies=copies, rate=rate, **fields)  # type: ignore[arg-type]


def rooms(*free_gib: float, backend: str = "custom") -> list[Room]:
    return [Room(f"c{i}", backend, "cpu", int(f * GiB)) for i, f in enumerate(free_gib)]


# -- model fields ---------------------------------------------------------------------------------------


def test_max_replicas_defaults_to_replicas_and_old_values_parse() -> None:
    old = ModelVersion.from_json(b'{"name": "m", "version": "1", "replicas": 2}')
    assert old.max_replicas == 0 and old.most_copies == 2 and not old.on_demand
    assert ModelVersion("m", "1", replicas=1, max_replicas=4).most_copies == 4
    on_demand = ModelVersion("m", "1", replicas=0)
    assert on_demand.on_demand and on_demand.most_copies == 1
    with pytest.raises(ValueError, match="max_replicas"):
        ModelVersion.from_json(b'{"name": "m", "version": "1", "max_replicas": "3"}')


# -- thresholds and hysteresis --------------------------------------------------------------------------


def test_a_copy_is_added_only_after_the_rate_stayed_above_target_for_the_up_delay() -> None:
    timers = Timers()
    hot = load(rate=25)  # one ready copy: 25 calls/s per copy > 10
    assert scale_target(hot, POLICY, timers, now=100.0) == 1  # just went above: wait
    assert scale_target(hot, POLICY, timers, now=101.0) == 1
    assert scale_target(hot, POLICY, timers, now=102.0) == 2  # stayed above for 2 s


def test_a_dip_below_target_restarts_the_up_delay() -> None:
    timers = Timers()
    assert scale_target(load(rate=25), POLICY, timers, now=0.0) == 1
    assert scale_target(load(rate=5), POLICY, timers, now=1.0) == 1
    assert scale_target(load(rate=25), POLICY, timers, now=2.5) == 1  # above again only since 2.5
    assert scale_target(load(rate=25), POLICY, timers, now=4.5) == 2


def test_no_copy_beyond_max_replicas_nor_while_a_new_one_is_loading() -> None:
    timers = Timers()
    full = load(rate=100, copies=("a", "b", "c"))  # most_copies 3
    assert scale_target(full, POLICY, timers, 0.0) == scale_target(full, POLICY, timers, 60.0) == 3
    loading = load(rate=100, copies=("a", "b"), ready=1)
    assert scale_target(loading, POLICY, timers, 0.0) == scale_target(loading, POLICY, timers, 60.0) == 2


def test_extra_copies_go_after_the_quiet_period_down_to_replicas_one_per_period() -> None:
    timers = Timers()
    quiet = load(rate=2, copies=("a", "b", "c"))
    assert scale_target(quiet, POLICY, timers, 0.0) == 3
    assert scale_target(quiet, POLICY, timers, 29.0) == 3
    assert scale_target(quiet, POLICY, timers, 30.0) == 2
    two = load(rate=2, copies=("a", "b"))
    assert scale_target(two, POLICY, timers, 31.0) == 2  # the next one waits another period
    assert scale_target(two, POLICY, timers, 59.0) == 2
    assert scale_target(two, POLICY, timers, 60.0) == 1
    one = load(rate=0, copies=("a",))
    assert scale_target(one, POLICY, timers, 1000.0) == 1  # never below replicas


def test_a_load_near_the_target_does_not_flap() -> None:
    """Two copies at 8 calls/s each (16 in all): below the target per copy, but one copy alone would take
    16 > 0.5 x 10, so no copy goes however long it lasts, and none is added either."""
    timers = Timers()
    steady = load(rate=16, copies=("a", "b"))
    assert {scale_target(steady, POLICY, timers, float(t)) for t in range(0, 600, 5)} == {2}


def test_copies_above_a_lowered_ceiling_go_one_per_pass_even_with_the_policy_off() -> None:
    off = Policy()  # copy_target_rps 0: copies do not follow load
    lowered = load(rate=500, copies=("a", "b", "c"), most_copies=1)
    assert scale_target(lowered, off, Timers(), 0.0) == 2
    assert scale_target(load(rate=500, copies=("a", "b"), most_copies=1), off, Timers(), 0.0) == 1
    assert scale_target(load(rate=500, copies=("a",), most_copies=1), off, Timers(), 0.0) == 1


def test_a_resident_load_on_demand_model_keeps_its_copy_until_evicted() -> None:
    timers = Timers()
    cold = load(rate=0, copies=("a",), replicas=0, most_copies=1)
    assert scale_target(cold, POLICY, timers, 0.0) == scale_target(cold, POLICY, timers, 1e6) == 1


@settings(max_examples=200, deadline=None)
@given(
    rates=st.lists(st.floats(0, 100, allow_nan=False), min_size=1, max_size=60),
    replicas=st.integers(0, 2),
    most=st.integers(1, 4),
)
def test_copies_stay_within_floor_and_ceiling_and_change_at_most_one_per_pass(
    rates: list[float], replicas: int, most: int
) -> None:
    timers = Timers()
    most = max(most, replicas, 1)
    copies = max(replicas, 1)
    for t, rate in enumerate(rates):
        current = load(
            rate=rate, copies=tuple(f"c{i}" for i in range(copies)), replicas=replicas, most_copies=most
        )
        new = scale_target(current, POLICY, timers, float(t * 10))
        assert abs(new - copies) <= 1
        assert max(replicas, 1) <= new <= most
        copies = new


# -- budget, distinct containers, priority --------------------------------------------------------------


def test_an_added_copy_goes_to_a_container_with_room_that_does_not_hold_it() -> None:
    timers = Timers()
    hot = load(rate=50, copies=("c0",))
    plan_autoscale([hot], rooms(8, 0.5, 2), POLICY, timers, 0.0)
    plan = plan_autoscale([hot], rooms(8, 0.5, 2), POLICY, timers, 5.0)
    # c0 holds it already (however much room it has), c1 has too little: c2.
    assert plan.changes == {"m@1": ("c0", "c2")}
    assert [d.action for d in plan.decisions] == ["add"]


def test_no_copy_is_added_over_a_memory_budget() -> None:
    timers = Timers()
    hot = load(rate=50, copies=("c0",))
    plan_autoscale([hot], rooms(8, 0.9), POLICY, timers, 0.0)
    plan = plan_autoscale([hot], rooms(8, 0.9), POLICY, timers, 5.0)
    assert plan.changes == {}
    assert [d.action for d in plan.decisions] == ["no room"]


def test_under_memory_pressure_the_hotter_model_gets_the_copy() -> None:
    timers = Timers()
    warm = load("warm@1", rate=30, copies=("c0",))
    hot = load("hot@1", rate=90, copies=("c0",))
    for now in (0.0, 5.0):
        plan = plan_autoscale([warm, hot], rooms(0, 1), POLICY, timers, now)
    assert plan.changes == {"hot@1": ("c0", "c1")}


def test_copies_of_other_backends_or_kinds_are_not_used() -> None:
    timers = Timers()
    hot = load(rate=50, copies=("c0",), kind="gpu")
    plan_autoscale([hot], rooms(8, 8), POLICY, timers, 0.0)
    assert plan_autoscale([hot], rooms(8, 8), POLICY, timers, 5.0).changes == {}  # cpu containers only
    hot = load(rate=50, copies=("c0",))
    assert plan_autoscale([hot], rooms(8, 8, backend="triton"), POLICY, timers, 10.0).changes == {}


# -- memory as a cache ----------------------------------------------------------------------------------


def on_demand(key: str, cid: str, idle_s: float, wanted: bool = False) -> ModelLoad:
    return load(key, copies=(cid,), replicas=0, most_copies=1, idle_s=idle_s, wanted=wanted)


def test_a_wanted_model_evicts_the_least_recently_used_load_on_demand_copies() -> None:
    wanted = load("new@1", copies=(), ready=0, replicas=0, most_copies=1, wanted=True)
    resident = [
        on_demand("recent@1", "c0", idle_s=10),
        on_demand("oldest@1", "c1", idle_s=500),
        on_demand("older@1", "c0", idle_s=300),
        load("floor@1", copies=("c1",), replicas=1),  # replicas >= 1: never evicted
    ]
    plan = plan_autoscale([wanted, *resident], rooms(0.5, 0), POLICY, Timers(), 0.0)
    # Least recently used first: oldest@1 alone frees the 1 GiB needed on c1, so nothing else goes.
    assert plan.changes == {"oldest@1": ()}
    assert [(d.action, d.model, d.container) for d in plan.decisions] == [("evict", "oldest@1", "c1")]
    assert plan.waiting == {"new@1"}


def test_copies_called_recently_or_waited_for_are_never_evicted() -> None:
    wanted = load("new@1", copies=(), ready=0, replicas=0, most_copies=1, wanted=True)
    busy = on_demand("busy@1", "c0", idle_s=1)  # called 1 s ago (< evict_idle_s)
    waited = on_demand("waited@1", "c1", idle_s=900, wanted=True)
    plan = plan_autoscale([wanted, busy, waited], rooms(0, 0), POLICY, Timers(), 0.0)
    assert plan.changes == {} and plan.waiting == {"new@1"} and not plan.blocked


def test_room_held_by_floors_only_fails_the_call_with_a_reason() -> None:
    wanted = load("new@1", copies=(), ready=0, replicas=0, most_copies=1, wanted=True)
    floors = [load("a@1", copies=("c0",)), load("b@1", copies=("c1",))]
    plan = plan_autoscale([wanted, *floors], rooms(0, 0), POLICY, Timers(), 0.0)
    assert plan.changes == {} and "new@1" in plan.blocked


def test_room_held_by_floors_says_no_container_can_make_room() -> None:
    wanted = load("new@1", copies=(), ready=0, replicas=0, most_copies=1, wanted=True)
    floors = [load("a@1", copies=("c0",)), load("b@1", copies=("c1",))]
    plan = plan_autoscale([wanted, *floors], rooms(0, 0), POLICY, Timers(), 0.0)
    assert plan.blocked == {"new@1": f"no custom container can make room for {GiB} bytes"}


def test_with_no_container_of_its_backend_up_a_wanted_model_is_told_so_not_about_room() -> None:
    wanted = load("new@1", copies=(), ready=0, replicas=0, most_copies=1, wanted=True)
    none_up = plan_autoscale([wanted], rooms(8, backend="triton"), POLICY, Timers(), 0.0)
    assert none_up.blocked == {"new@1": "no custom container is up"}
    gpu_only = [Room("g0", "custom", "gpu", 8 * GiB)]
    no_cpu = plan_autoscale([wanted], gpu_only, POLICY, Timers(), 0.0)  # the model is for cpu containers
    assert no_cpu.blocked == {"new@1": "no custom container of kind cpu is up"}


def test_unclaimed_draining_room_is_claimed_instead_of_evicting_more() -> None:
    wanted = load("new@1", copies=(), ready=0, replicas=0, most_copies=1, wanted=True)
    idle = on_demand("idle@1", "c0", idle_s=900)
    draining = [Room("c0", "custom", "cpu", 0, draining_bytes=GiB)]
    assert make_room(wanted, draining, [idle], POLICY) == ("c0", [])
    plan = plan_autoscale([wanted, idle], draining, POLICY, Timers(), 0.0)
    assert plan.changes == {} and plan.claims == {"new@1": ("c0", GiB)} and plan.waiting == {"new@1"}


def test_two_waiting_models_do_not_count_on_the_same_evicted_room() -> None:
    first = load("a@1", copies=(), ready=0, replicas=0, most_copies=1, wanted=True)
    second = load("b@1", copies=(), ready=0, replicas=0, most_copies=1, wanted=True)
    idle = [on_demand("old@1", "c0", idle_s=900), on_demand("older@1", "c0", idle_s=1000)]
    plan = plan_autoscale([first, second, *idle], rooms(0), POLICY, Timers(), 0.0)
    assert plan.changes == {"older@1": (), "old@1": ()}  # one eviction for each
    assert plan.claims == {"a@1": ("c0", GiB), "b@1": ("c0", GiB)}


# -- counts for the map writers -------------------------------------------------------------------------


def test_full_rebalance_keeps_extra_and_resident_on_demand_copies_and_places_no_idle_on_demand_model() -> (
    None
):
    containers = [Container(c, f"x:{c}", memory_bytes=8 * GiB, backend="custom") for c in ("a", "b", "c")]
    models = [
        ModelVersion("hot", "1", backend="custom", memory_bytes=GiB, replicas=1, max_replicas=3),
        ModelVersion("lazy", "1", backend="custom", memory_bytes=GiB, replicas=0),
        ModelVersion("idle", "1", backend="custom", memory_bytes=GiB, replicas=0),
    ]
    fleet = Fleet.of(models=models, containers=containers, assignments={"hot@1": ["a", "b"], "lazy@1": ["c"]})
    assert kept_copies(fleet) == {"hot@1": 2, "lazy@1": 1}
    proposal = plan_rebalance(fleet)
    assert proposal.after["hot@1"] == ("a", "b") and proposal.after["lazy@1"] == ("c",)
    assert "idle@1" not in proposal.after
    fleet.wanted["idle@1"] = ""
    assert copies_to_place(fleet, ["idle@1", "hot@1", "lazy@1"]) == {"idle@1": 1, "lazy@1": 1}


def test_rates_are_summed_across_routers_and_stale_reports_count_only_for_last_use() -> None:
    reports = [
        RateReport("r1", t=100.0, period_s=5, rates={"m@1": 4.0}, idle_s={"m@1": 0.5}),
        RateReport("r2", t=99.0, period_s=5, rates={"m@1": 6.0, "n@1": 1.0}, idle_s={"m@1": 3.0, "n@1": 2.0}),
        RateReport("gone", t=10.0, period_s=5, rates={"m@1": 100.0}, idle_s={"o@1": 1.0}),
    ]
    summed = sum_reports(reports, now=101.0)
    assert summed["m@1"].rate == 10.0 and summed["m@1"].idle_s == pytest.approx(1.5)
    assert summed["n@1"].rate == 1.0
    assert summed["o@1"].rate == 0.0 and summed["o@1"].idle_s == pytest.approx(92.0)
    with pytest.raises(ValueError, match="rates"):
        RateReport.from_json("r", b'{"t": 1, "period_s": 5, "rates": {"m@1": -1}}')


def test_a_router_reports_the_models_called_in_the_period_and_the_store_gives_their_sum(
    tmp_path: Path,
) -> None:
    async def scenario() -> tuple[RateReport, RateReport, dict[str, ModelRate]]:
        async with open_store(str(tmp_path / "store")) as store:
            counter = RateCounter(store, period_s=1.0, router_id="r1")
            for _ in range(30):
                counter.count("hot@1")
            counter.count("cold@1")
            first = counter.report(elapsed_s=2.0)
            await counter._write(first)
            counter.count("hot@1")
            second = counter.report(elapsed_s=1.0)  # cold@1 was not called in this period
            summed = await read_rates(store, time.time())
            await counter.stop()
            return first, second, summed

    first, second, summed = asyncio.run(scenario())
    assert first.rates == {"hot@1": 15.0, "cold@1": 0.5} and set(first.idle_s) == {"hot@1", "cold@1"}
    assert second.rates == {"hot@1": 1.0} and set(second.idle_s) == {"hot@1"}
    assert summed["hot@1"].rate == 15.0 and summed["cold@1"].rate == 0.5  # the written (first) report


def test_when_calls_stop_the_report_goes_and_an_idle_router_writes_nothing(tmp_path: Path) -> None:
    """Idle is idle: every store write wakes every watcher of the fleet (routers, agents, controller)."""

    async def scenario() -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
        async with open_store(str(tmp_path / "store")) as store:
            _, revision = await store.get_prefix("/")
            watch = store.watch_prefix("/", revision + 1)
            counter = RateCounter(store, period_s=0.1, router_id="r1")
            counter.count("hot@1")
            counter.start()
            written: list[tuple[str, str]] = []
            try:
                async with asyncio.timeout(10):  # a report, then its deletion a period later
                    async for events in watch:
                        written += [(e.kind, e.key) for e in events]
                        if ("delete", counter.key) in written:
                            break
                after: list[tuple[str, str]] = []
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(1.0):  # ten idle periods: the absence being tested
                        async for events in watch:
                            after += [(e.kind, e.key) for e in events]
            finally:
                await counter.stop()
            return written, after

    written, after = asyncio.run(scenario())
    assert written == [("put", RATES + "r1"), ("delete", RATES + "r1")]
    assert after == [], f"an idle router wrote {after}"
