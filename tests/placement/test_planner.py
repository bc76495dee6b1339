"""The planner's invariants (hypothesis) and its documented choices (examples)."""

from __future__ import annotations

import random
from collections import defaultdict
from collections.abc import Sequence

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from modelyard.placement.planner import WALK_STEPS, Capacity, Demand, Plan, plan
from modelyard.placement.ring import Ring, vnode_positions

ALLOWED = {"gpu": {"gpu"}, "cpu": {"cpu"}, "any": {"gpu", "cpu"}}

# Plans of tiny fleets take milliseconds, but the first call of a run also builds caches and imports.
relaxed = settings(deadline=None, suppress_health_check=[HealthCheck.too_slow])


@st.composite
def fleets(
    draw: st.DrawFn, max_models: int = 30, max_containers: int = 8
) -> tuple[list[Demand], list[Capacity]]:
    """Small fleets whose demand ranges from a fraction of capacity to several times it."""
    containers = draw(
        st.lists(
            st.tuples(st.integers(1, 400), st.sampled_from(["gpu", "cpu"])),
            min_size=0,
            max_size=max_containers,
        )
    )
    models = draw(
        st.lists(
            st.tuples(st.integers(0, 150), st.integers(1, 3), st.sampled_from(["gpu", "cpu", "any"])),
            max_size=max_models,
        )
    )
    return (
        [Demand(f"m{i}", size, replicas, kind) for i, (size, replicas, kind) in enumerate(models)],
        [Capacity(f"c{i}", memory, kind) for i, (memory, kind) in enumerate(containers)],
    )


def used_bytes(models: Sequence[Demand], result: Plan) -> dict[str, int]:
    size = {model.name: model.memory_bytes for model in models}
    used: dict[str, int] = defaultdict(int)
    for name, ids in result.assignments.items():
        for container_id in ids:
            used[container_id] += size[name]
    return used


def copies(result: Plan) -> set[tuple[str, str]]:
    return {(name, container_id) for name, ids in result.assignments.items() for container_id in ids}


@relaxed
@given(fleets())
def test_no_container_is_given_more_than_its_memory(fleet: tuple[list[Demand], list[Capacity]]) -> None:
    models, containers = fleet
    used = used_bytes(models, plan(models, containers))
    for container in containers:
        assert used[container.id] <= container.memory_bytes


@relaxed
@given(fleets())
def test_copies_only_go_to_containers_of_an_allowed_kind(fleet: tuple[list[Demand], list[Capacity]]) -> None:
    models, containers = fleet
    kind_of = {container.id: container.kind for container in containers}
    result = plan(models, containers)
    for model in models:
        for container_id in result.assignments.get(model.name, ()):
            assert kind_of[container_id] in ALLOWED[model.kind]


@relaxed
@given(fleets())
def test_replicas_are_on_distinct_containers_and_never_more_than_asked(
    fleet: tuple[list[Demand], list[Capacity]],
) -> None:
    models, containers = fleet
    result = plan(models, containers)
    for model in models:
        ids = result.assignments.get(model.name, ())
        assert len(set(ids)) == len(ids) <= model.replicas


@relaxed
@given(fleets())
def test_each_model_is_fully_placed_or_listed_unplaced_with_a_reason(
    fleet: tuple[list[Demand], list[Capacity]],
) -> None:
    models, containers = fleet
    result = plan(models, containers)
    for model in models:
        placed = len(result.assignments.get(model.name, ()))
        if placed < model.replicas:
            assert result.unplaced[model.name]
        else:
            assert model.name not in result.unplaced
    assert all(ids for ids in result.assignments.values())
    assert set(result.assignments) | set(result.unplaced) <= {model.name for model in models}


@relaxed
@given(fleets(), st.randoms(use_true_random=False))
def test_same_inputs_in_any_order_give_the_same_plan(
    fleet: tuple[list[Demand], list[Capacity]], rng: random.Random
) -> None:
    models, containers = fleet
    first = plan(models, containers)
    shuffled_models, shuffled_containers = list(models), list(containers)
    rng.shuffle(shuffled_models)
    rng.shuffle(shuffled_containers)
    again = plan(shuffled_models, shuffled_containers)
    assert again == first
    assert list(again.assignments.items()) == list(first.assignments.items())


@relaxed
@given(fleets(), st.booleans())
def test_replanning_unchanged_inputs_moves_nothing(
    fleet: tuple[list[Demand], list[Capacity]], rebalance_first: bool
) -> None:
    models, containers = fleet
    first = plan(models, containers, rebalance=rebalance_first)
    again = plan(models, containers, first.assignments)
    if rebalance_first:
        # Rebalancing may free room that a model short of copies can now use; nothing placed moves.
        assert copies(first) <= copies(again)
    else:
        assert again == first


@relaxed
@given(fleets(), st.integers(0, 7))
def test_removing_a_container_moves_exactly_the_copies_it_held(
    fleet: tuple[list[Demand], list[Capacity]], which: int
) -> None:
    models, containers = fleet
    if not containers:
        return
    gone = containers[which % len(containers)].id
    first = plan(models, containers)
    after = plan(models, [c for c in containers if c.id != gone], first.assignments)
    for model in models:
        before_ids = set(first.assignments.get(model.name, ()))
        after_ids = set(after.assignments.get(model.name, ()))
        if gone in before_ids:
            assert before_ids - {gone} <= after_ids
            assert len(after_ids - before_ids) <= 1
        else:
            assert after_ids == before_ids
            assert (model.name in after.unplaced) == (model.name in first.unplaced)


@st.composite
def comfortable_fleets(draw: st.DrawFn) -> tuple[list[Demand], list[Capacity]]:
    """At least 3 containers of each kind, models at most a quarter of the smallest one, and demand below
    half of what the containers not excluded by a model's other replicas can hold."""
    gpus = draw(st.integers(3, 6))
    cpus = draw(st.integers(3, 6))
    containers = [
        Capacity(f"c{i}", draw(st.integers(100, 300)), "gpu" if i < gpus else "cpu")
        for i in range(gpus + cpus)
    ]
    wanted = draw(
        st.lists(
            st.tuples(st.integers(1, 25), st.integers(1, 3), st.sampled_from(["gpu", "cpu", "any"])),
            max_size=60,
        )
    )
    budget = {"gpu": 50 * (gpus - 2), "cpu": 50 * (cpus - 2), "any": 50 * (gpus + cpus - 2)}
    demand = {"gpu": 0, "cpu": 0, "any": 0}
    models = []
    for i, (size, replicas, kind) in enumerate(wanted):
        kinds = ("gpu", "cpu", "any") if kind == "any" else (kind, "any")
        if all(demand[k] + size * replicas <= budget[k] for k in kinds):
            for k in kinds:
                demand[k] += size * replicas
            models.append(Demand(f"m{i}", size, replicas, kind))
    return models, containers


@relaxed
@given(comfortable_fleets())
def test_everything_is_placed_when_demand_is_comfortably_below_capacity(
    fleet: tuple[list[Demand], list[Capacity]],
) -> None:
    models, containers = fleet
    result = plan(models, containers)
    assert result.unplaced == {}
    for model in models:
        assert len(result.assignments[model.name]) == model.replicas


def fair_shares(models: Sequence[Demand], containers: Sequence[Capacity], result: Plan) -> dict[str, float]:
    used = used_bytes(models, result)
    shares = {}
    for kind in ("gpu", "cpu"):
        of_kind = [c for c in containers if c.kind == kind]
        capacity = sum(c.memory_bytes for c in of_kind)
        placed = sum(used[c.id] for c in of_kind)
        for container in of_kind:
            shares[container.id] = container.memory_bytes / capacity * placed
    return shares


@relaxed
@given(fleets(max_models=40), st.integers(1, 400), st.sampled_from(["gpu", "cpu"]))
def test_rebalance_moves_copies_only_onto_containers_below_their_fair_share(
    fleet: tuple[list[Demand], list[Capacity]], memory: int, kind: str
) -> None:
    models, containers = fleet
    first = plan(models, containers)
    grown = [*containers, Capacity("new", memory, kind)]
    sticky = plan(models, grown, first.assignments)
    balanced = plan(models, grown, first.assignments, rebalance=True)
    used, fair = used_bytes(models, sticky), fair_shares(models, grown, sticky)
    used_after = used_bytes(models, balanced)
    for _, container_id in copies(balanced) - copies(sticky):
        assert used[container_id] < fair[container_id]
        # Adopting stops short of overshooting the fair share by more than the container missed it by.
        assert (
            abs(used_after[container_id] - fair[container_id]) <= fair[container_id] - used[container_id] + 1
        )
    for model in models:
        assert len(balanced.assignments.get(model.name, ())) == len(sticky.assignments.get(model.name, ()))
    assert balanced.unplaced == sticky.unplaced


def test_previous_copies_that_are_no_longer_valid_are_replaced() -> None:
    containers = [Capacity("cpu-a", 100, "cpu"), Capacity("cpu-b", 100, "cpu"), Capacity("gpu-a", 100, "gpu")]
    models = [
        Demand("wrong-kind", 10, 1, "gpu"),
        Demand("too-many", 10, 1, "cpu"),
        Demand("twice", 10, 2, "cpu"),
    ]
    previous = {
        "wrong-kind": ["cpu-a"],
        "too-many": ["cpu-a", "cpu-b"],
        "twice": ["cpu-b", "cpu-b", "gone"],
        "deleted-model": ["cpu-a"],
    }
    result = plan(models, containers, previous)
    assert result.assignments == {
        "wrong-kind": ("gpu-a",),
        "too-many": ("cpu-a",),
        "twice": ("cpu-a", "cpu-b"),
    }


def test_when_previous_copies_no_longer_fit_the_models_placed_first_keep_theirs() -> None:
    models = [Demand("big", 60, 1, "cpu"), Demand("small", 50, 1, "cpu")]
    result = plan(models, [Capacity("only", 100, "cpu")], {"big": ["only"], "small": ["only"]})
    assert result.assignments == {"big": ("only",)}
    assert result.unplaced == {"small": "no cpu container has 50 bytes free"}


def test_kind_pinned_models_are_placed_before_bigger_any_models() -> None:
    result = plan(
        [Demand("flexible", 80, 1, "any"), Demand("pinned", 60, 1, "cpu")], [Capacity("c", 100, "cpu")]
    )
    assert result.assignments == {"pinned": ("c",)}
    assert set(result.unplaced) == {"flexible"}


def test_models_with_more_replicas_are_placed_before_bigger_ones() -> None:
    containers = [Capacity("a", 100, "gpu"), Capacity("b", 100, "gpu")]
    result = plan([Demand("single", 90, 1, "gpu"), Demand("pair", 50, 2, "gpu")], containers)
    assert result.assignments == {"pair": ("a", "b")}
    assert set(result.unplaced) == {"single"}


def test_a_copy_finds_the_last_container_with_room_however_far_the_walk() -> None:
    containers = [Capacity(f"c{i:03d}", 100, "cpu") for i in range(4 * WALK_STEPS)]
    models = [Demand(f"m{i:03d}", 100, 1, "cpu") for i in range(len(containers))]
    result = plan(models, containers)
    assert result.unplaced == {}
    assert sorted(ids[0] for ids in result.assignments.values()) == [c.id for c in containers]


@pytest.mark.parametrize(
    ("model", "containers", "reason"),
    [
        (Demand("m", 500, 1, "gpu"), [Capacity("g", 100, "gpu")], "no gpu container has 500 bytes free"),
        (Demand("m", 5, 1, "gpu"), [Capacity("c", 100, "cpu")], "no gpu containers"),
        (Demand("m", 5, 1, "any"), [], "no containers"),
        (
            Demand("m", 5, 3, "any"),
            [Capacity("g", 100, "gpu"), Capacity("c", 100, "cpu")],
            "placed 2 of 3 replicas: only 2 gpu or cpu containers",
        ),
        (
            Demand("m", 60, 2, "cpu"),
            [Capacity("a", 100, "cpu"), Capacity("b", 50, "cpu")],
            "placed 1 of 2 replicas: no other cpu container has 60 bytes free",
        ),
    ],
)
def test_unplaced_models_say_why(model: Demand, containers: list[Capacity], reason: str) -> None:
    assert plan([model], containers).unplaced == {"m": reason}


@pytest.mark.parametrize(
    ("models", "containers"),
    [
        ([Demand("m", 1), Demand("m", 2)], []),
        ([Demand("m", 1, 0)], []),
        ([Demand("m", -1)], []),
        ([Demand("m", 1, 1, "tpu")], []),
        ([], [Capacity("c", 1, "cpu"), Capacity("c", 2, "cpu")]),
        ([], [Capacity("c", 1, "any")]),
    ],
)
def test_inconsistent_inputs_raise_value_error(models: list[Demand], containers: list[Capacity]) -> None:
    with pytest.raises(ValueError):
        plan(models, containers)


def test_rebalance_fills_a_new_container_to_about_its_fair_share_from_the_fullest() -> None:
    rng = random.Random(7)
    containers = [Capacity(f"c{i:02d}", 1000, "cpu") for i in range(20)]
    models = [Demand(f"m{i:04d}", rng.randint(1, 30), 1, "any") for i in range(1000)]
    first = plan(models, containers)
    grown = [*containers, Capacity("new", 1000, "cpu")]
    balanced = plan(models, grown, first.assignments, rebalance=True)
    fair = fair_shares(models, grown, balanced)["new"]
    adopted = used_bytes(models, balanced)["new"]
    assert 0.5 * fair <= adopted <= 1.5 * fair
    assert {container_id for _, container_id in copies(balanced) - copies(first)} == {"new"}


def test_ring_positions_of_a_container_do_not_depend_on_the_others() -> None:
    a, b = vnode_positions("a", 1 << 34), vnode_positions("b", 1 << 34)
    alone = Ring.build(a, [0] * len(a), 4)
    together = Ring.build([*a, *b], [0] * len(a) + [1] * len(b), 4)
    assert [
        p for p, owner in zip(together.positions, together.owners, strict=True) if owner == 0
    ] == alone.positions
    assert len(alone) == len(a) > 1
