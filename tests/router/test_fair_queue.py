"""The fair queue as a pure structure: nobody starves, shares follow weights, each tenant's calls in order."""

from __future__ import annotations

from collections import Counter

from hypothesis import given
from hypothesis import strategies as st

from modelyard.router.fair_queue import FairQueue, pops_before

weights = st.dictionaries(
    st.sampled_from(["a", "b", "c", "d", "e"]), st.integers(min_value=1, max_value=4), min_size=1
)


@given(weights, st.data())
def test_no_waiting_tenant_waits_longer_than_one_round_of_the_others(
    tenant_weights: dict[str, int], data: st.DataObject
) -> None:
    queue: FairQueue[int] = FairQueue()
    backlog = {t: data.draw(st.integers(min_value=1, max_value=40), label=t) for t in tenant_weights}
    for tenant, n in backlog.items():
        for i in range(n):
            queue.push(tenant, i, tenant_weights[tenant])
    round_size = sum(tenant_weights.values())
    since_served = dict.fromkeys(backlog, 0)
    while (popped := queue.pop()) is not None:
        tenant, _ = popped
        for other in since_served:
            since_served[other] = 0 if other == tenant else since_served[other] + 1
        for other, gap in since_served.items():
            if queue.queued(other):
                assert gap <= round_size, f"{other} waited {gap} pops with {queue.queued(other)} queued"
    assert len(queue) == 0


@given(weights, st.integers(min_value=1, max_value=5))
def test_backlogged_tenants_are_served_in_proportion_to_their_weights(
    tenant_weights: dict[str, int], rounds: int
) -> None:
    queue: FairQueue[int] = FairQueue()
    for tenant, weight in tenant_weights.items():
        for i in range(weight * rounds + 10):  # more than `rounds` rounds' worth: all stay backlogged
            queue.push(tenant, i, weight)
    served = Counter(queue.pop()[0] for _ in range(sum(tenant_weights.values()) * rounds))  # type: ignore[index]
    assert served == Counter({t: w * rounds for t, w in tenant_weights.items()})


def test_a_tenant_with_many_callers_gets_no_more_than_one_with_few() -> None:
    queue: FairQueue[str] = FairQueue()
    for i in range(100):
        queue.push("noisy", f"n{i}", 2)
    for i in range(3):
        queue.push("quiet", f"q{i}", 2)
    first_ten = [queue.pop() for _ in range(10)]
    assert [item for tenant, item in first_ten if tenant == "quiet"] == ["q0", "q1", "q2"]  # type: ignore[misc]


@given(st.lists(st.tuples(st.sampled_from("abc"), st.booleans()), max_size=60))
def test_every_item_leaves_once_in_its_tenants_order(ops: list[tuple[str, bool]]) -> None:
    queue: FairQueue[int] = FairQueue()
    pushed: dict[str, list[int]] = {}
    popped: dict[str, list[int]] = {}
    for n, (tenant, pop) in enumerate(ops):
        if pop:
            got = queue.pop()
            if got is not None:
                popped.setdefault(got[0], []).append(got[1])
        else:
            queue.push(tenant, n, 1 + n % 3)
            pushed.setdefault(tenant, []).append(n)
    while (got := queue.pop()) is not None:
        popped.setdefault(got[0], []).append(got[1])
    assert popped == pushed


def test_removed_items_never_leave_and_an_emptied_tenant_loses_its_turn() -> None:
    queue: FairQueue[str] = FairQueue()
    queue.push("a", "a0")
    queue.push("b", "b0")
    assert queue.remove("a", "a0")
    assert not queue.remove("a", "a0")
    assert queue.pop() == ("b", "b0")
    assert queue.pop() is None and len(queue) == 0


def test_a_tenant_with_nothing_queued_goes_first() -> None:
    queue: FairQueue[str] = FairQueue()
    for i in range(20):
        queue.push("noisy", f"n{i}", 4)
    assert queue.pop() == ("noisy", "n0")  # noisy's turn has begun
    queue.push("quiet", "q0", 1)
    assert queue.pop() == ("quiet", "q0")
    queue.push("quiet", "q1", 1)  # quiet had nothing queued again: first again
    queue.push("quiet", "q2", 1)  # but its second waits for noisy's turn to finish (3 left of 4)
    assert [queue.pop() for _ in range(5)] == [
        ("quiet", "q1"),
        ("noisy", "n1"),
        ("noisy", "n2"),
        ("noisy", "n3"),
        ("quiet", "q2"),
    ]


def test_pops_before_counts_own_queue_and_the_others_share() -> None:
    queues = {"noisy": (50, 2), "quiet": (1, 2)}
    assert pops_before(queues, "quiet", 2) == 1 + 2  # its own one ahead, and noisy's turns meanwhile
    assert pops_before(queues, "new", 4) == 0  # nothing queued: it goes first
