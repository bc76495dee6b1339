"""The fleet summary (placement/summary.py): what it counts, its stored form, and the controller keeping it
current in a real store."""

from __future__ import annotations

import asyncio
import json

import pytest

from modelyard.placement import registry
from modelyard.placement.controller import PlacementController
from modelyard.placement.model import Container, CopyState, ModelVersion
from modelyard.placement.registry import Fleet
from modelyard.placement.store import Store, open_store
from modelyard.placement.summary import SUMMARY, FleetSummary, summarize

GiB = 1024**3


def fleet() -> Fleet:
    return Fleet.of(
        models=[
            ModelVersion("a", "1", memory_bytes=GiB),
            ModelVersion("b", "1", memory_bytes=2 * GiB, replicas=2),
            ModelVersion("c", "1", memory_bytes=GiB, backend="custom"),
            ModelVersion("d", "1", memory_bytes=GiB),  # never assigned
        ],
        containers=[Container("x", "h:1", memory_bytes=8 * GiB), Container("y", "h:2", memory_bytes=8 * GiB)],
        assignments={"a@1": ["x"], "b@1": ["x", "gone"], "c@1": ["y"]},
        states={("x", "a@1"): CopyState("ready"), ("x", "b@1"): CopyState("loading")},
    )


def test_summary_counts_copies_per_container_and_state_and_what_is_short_or_lost() -> None:
    summary = summarize(fleet(), writer="w", now=12.5)
    lines = {line.id: line for line in summary.containers}
    assert (lines["x"].used_bytes, lines["x"].copies, lines["x"].live) == (3 * GiB, 2, True)
    assert (lines["y"].used_bytes, lines["y"].copies) == (GiB, 1)
    assert (lines["gone"].live, lines["gone"].copies) == (False, 1)
    assert summary.models == 4 and summary.copies == 4 and summary.lost == 1
    # c@1 on y has no state yet: assigned; the copy on `gone` is lost, not counted by phase
    assert summary.states == {"assigned": 1, "loading": 1, "ready": 1}
    assert summary.under_replicated == 2 and summary.short_sample == ("b@1", "d@1")
    assert summary.backends == {"custom": 1, "triton": 3}


def test_summary_round_trips_through_its_stored_form() -> None:
    summary = summarize(fleet(), writer="w", now=12.5)
    assert FleetSummary.from_json(summary.to_json()) == summary


@pytest.mark.parametrize(
    "raw",
    [
        b"[]",
        b'{"models": -1}',
        b'{"containers": [["x", "cpu", "yes", 1, 2, 3]]}',
        b'{"states": {"ready": "many"}}',
        b'{"short_sample": [1]}',
    ],
)
def test_a_summary_that_does_not_parse_is_refused_with_a_value_error(raw: bytes) -> None:
    with pytest.raises(ValueError):
        FleetSummary.from_json(raw)


def test_the_leading_controller_writes_the_summary_and_rewrites_it_when_the_fleet_changes(
    store_url: str,
) -> None:
    async def scenario(store: Store) -> None:
        await registry.register_container(store, Container("x", "h:1", memory_bytes=8 * GiB))
        await registry.register_model(store, ModelVersion("a", "1", memory_bytes=GiB))
        controller = PlacementController(store, debounce_s=0.05, summary_every_s=0.05)
        task = asyncio.create_task(controller.run())
        try:

            async def summary_with(models: int, copies: int) -> FleetSummary:
                async with asyncio.timeout(20):
                    while True:
                        item = await store.get(SUMMARY)
                        if item is not None:
                            summary = FleetSummary.from_json(item.value)
                            if (summary.models, summary.copies) == (models, copies):
                                return summary
                        await asyncio.sleep(0.05)

            first = await summary_with(1, 1)
            assert first.writer == controller.holder and first.containers[0].id == "x"
            await registry.register_model(store, ModelVersion("b", "1", memory_bytes=GiB))
            second = await summary_with(2, 2)
            assert second.revision > first.revision
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    async def main() -> None:
        async with open_store(store_url) as store:
            await scenario(store)

    asyncio.run(main())


def test_a_summary_is_compact_json() -> None:
    data = json.loads(summarize(fleet()).to_json())
    assert data["containers"][0] == ["gone", "?", False, 2 * GiB, 0, 1]
