"""Pages of model versions for `modelyard models list`, read without reading the whole fleet.

A page is a range read of at most `limit` registry keys after a continue token (the last key shown), the
assignments of exactly those keys (same order, so one more range read), then the containers those copies
are on and the copies' states, key by key: O(page) keys, whatever the size of the fleet. The reads are
several, not one snapshot: a page can show a copy state a moment newer than its assignment.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from modelyard.placement.registry import ASSIGN, CONTAINERS, GENERATION, MODELS, Fleet, state_key
from modelyard.placement.store import Event, KeyValue, Store
from modelyard.placement.store.base import prefix_end

# Copy-state reads in flight at once while reading a page.
_STATE_READS = 64


@dataclass(frozen=True)
class Page:
    fleet: Fleet  # the page's models, their assignments, the containers and states of their copies
    next_after: str  # the continue token of the next page; "" when this is the last page


async def read_page(store: Store, after: str, limit: int) -> Page:
    """Model versions after `after` (a `name@version`; "" from the start), at most `limit`."""
    start = MODELS + after + "\0" if after else MODELS
    registered = await store.get_range(start, prefix_end(MODELS), limit + 1)
    more = len(registered) > limit
    registered = registered[:limit]
    if not registered:
        return Page(Fleet(), "")
    first, last = registered[0].key[len(MODELS) :], registered[-1].key[len(MODELS) :]
    assigned, generation = await asyncio.gather(
        store.get_range(ASSIGN + first, ASSIGN + last + "\0"), store.get(GENERATION)
    )
    items: list[KeyValue] = [*registered, *assigned]
    if generation is not None:
        items.append(generation)
    fleet = Fleet.from_items(items, 0)
    gate = asyncio.Semaphore(_STATE_READS)

    async def read(key: str) -> KeyValue | None:
        async with gate:
            return await store.get(key)

    async def read_all(keys: list[str]) -> None:
        for item in await asyncio.gather(*(read(key) for key in keys)):
            if item is not None:
                fleet.apply(Event("put", item.key, item.value, item.mod_revision))

    # The containers the page's copies are on (live ones have a key), then those copies' states.
    await read_all(sorted({CONTAINERS + cid for ids in fleet.assignments.values() for cid in ids}))
    await read_all(
        [
            state_key(cid, key)
            for key, ids in fleet.assignments.items()
            for cid in ids
            if cid in fleet.containers
        ]
    )
    return Page(fleet, last if more else "")
