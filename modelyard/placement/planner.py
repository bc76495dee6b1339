"""The placement planner: which containers hold copies of which models. Pure: no I/O, no clock.

Consistent hashing with bounded loads, by memory (docs/control-path.md says who runs it, and when):

1. Sticky: every still-valid copy of the previous map stays where it is.
2. Everything missing is placed in a fixed order (kind-pinned models before `any`, more replicas first,
   biggest first, then by name). A model walks the ring of the kinds it may use from its own hash and
   takes the first containers with room under a soft cap; replicas go to distinct containers.
3. A walk is bounded. When it finds no room within `WALK_STEPS` vnodes, the model falls back to a search
   over a free-bytes index of every container of its kinds, so placing stays fast near capacity and
   never misses a container that has room. A size that found no room at all marks the kind as full for
   that size and bigger, so later models of that size skip the walk.
4. With `rebalance`, containers far below their fair share (a new one, typically) adopt copies of the
   models whose ring walks now reach them before the container holding the copy.

The soft cap is the "bounded loads" part: while walking, a container may fill to the expected utilization
of its kind plus SPREAD_SLACK_PCT points, so the walk spreads models instead of filling containers one
after another, and no container ends far above the mean. When demand nears capacity the soft cap reaches
the hard one, and the fallback switches from worst fit (spread) to best fit (pack).
"""

from __future__ import annotations

from bisect import bisect_left, insort
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from itertools import compress, islice, repeat
from operator import eq, lt, mul
from typing import TYPE_CHECKING

from modelyard.placement.model import CONTAINER_KINDS, MODEL_KINDS
from modelyard.placement.ring import Ring, model_positions, vnode_positions

if TYPE_CHECKING:
    import numpy as np
    from numpy.typing import NDArray

# How many vnodes a walk visits before falling back to the free-bytes index. Walks far from capacity stop
# at the first vnode or two; this bound only matters near capacity, where long walks would dominate.
WALK_STEPS = 24
# A container may fill to its kind's expected utilization plus this many points while walking: the bound
# that keeps every container within a few points of the mean.
SPREAD_SLACK_PCT = 5
# With rebalance, containers below half their fair share adopt copies up to their fair share; containers
# closer to it are left alone so that rebalancing a settled fleet moves nothing.
ADOPT_BELOW_PCT = 50
# A container adopts a model when it is within this many vnodes of the model's position on the ring.
ADOPT_DEPTH = 4

_GPU, _CPU = 0, 1
_KIND_CODES = {"gpu": (_GPU,), "cpu": (_CPU,), "any": (_GPU, _CPU)}
_KIND_LABELS = {"gpu": "gpu", "cpu": "cpu", "any": "gpu or cpu"}
_INFINITY = 1 << 256  # bigger than any memory size


@dataclass(frozen=True)
class Demand:
    """A model to place: `replicas` copies of `memory_bytes` each, on containers of `kind` (gpu|cpu|any)."""

    name: str
    memory_bytes: int
    replicas: int = 1
    kind: str = "any"


@dataclass(frozen=True)
class Demands:
    """Models as columns, model `i` being `Demand(names[i], memory_bytes[i], replicas[i], kinds[i])`.

    What the planner works on: a million Demand objects take seconds to build and to read, four tuples a
    fraction of that. `plan` takes either. Raises ValueError on columns of different lengths, duplicate
    names, unknown kinds, negative memory or replicas below 1.
    """

    names: tuple[str, ...]
    memory_bytes: tuple[int, ...]
    replicas: tuple[int, ...]
    kinds: tuple[str, ...]

    def __post_init__(self) -> None:
        if not len(self.names) == len(self.memory_bytes) == len(self.replicas) == len(self.kinds):
            raise ValueError("the columns of Demands must have the same length")
        # One C-level pass per rule; the loop finds the model to name only when one breaks a rule. Names in
        # strict order (the usual) are unique without a set of a million names.
        if not (
            (_in_strict_order(self.names) or len(set(self.names)) == len(self.names))
            and all(map(MODEL_KINDS.__contains__, self.kinds))
            and min(self.memory_bytes, default=0) >= 0
            and min(self.replicas, default=1) >= 1
        ):
            names: set[str] = set()
            for name, memory_bytes, replicas, kind in zip(
                self.names, self.memory_bytes, self.replicas, self.kinds, strict=True
            ):
                if name in names:
                    raise ValueError(f"duplicate model {name!r}")
                names.add(name)
                if kind not in MODEL_KINDS:
                    raise ValueError(f"model {name!r}: unknown kind {kind!r}")
                if memory_bytes < 0 or replicas < 1:
                    raise ValueError(f"model {name!r}: needs memory_bytes >= 0 and replicas >= 1")

    @classmethod
    def of(cls, models: Iterable[Demand]) -> Demands:
        models = list(models)
        return cls(
            tuple(model.name for model in models),
            tuple(model.memory_bytes for model in models),
            tuple(model.replicas for model in models),
            tuple(model.kind for model in models),
        )

    def __len__(self) -> int:
        return len(self.names)


def _in_strict_order(names: Sequence[str]) -> bool:
    return all(map(lt, names, islice(names, 1, None)))


@dataclass(frozen=True)
class Capacity:
    """A container's memory budget and kind (gpu|cpu)."""

    id: str
    memory_bytes: int
    kind: str


@dataclass(frozen=True)
class Plan:
    """Container ids per model (models with at least one copy), why each short model is short, and the bytes
    of the copies on each container (every container, 0 when empty)."""

    assignments: dict[str, tuple[str, ...]]
    unplaced: dict[str, str]
    used_bytes: dict[str, int]


def plan(
    models: Sequence[Demand] | Demands,
    containers: Sequence[Capacity],
    previous: Mapping[str, Sequence[str]] | None = None,
    *,
    rebalance: bool = False,
) -> Plan:
    """Place `models` on `containers`, keeping every still-valid copy of `previous` where it is.

    The result depends on the inputs only, not on their order. Raises ValueError on duplicate names or ids,
    unknown kinds, negative memory or replicas below 1.
    """
    table = models if isinstance(models, Demands) else Demands.of(models)
    _check(containers)
    planner = _Planner(table, containers)
    planner.keep(previous or {})
    planner.place_missing()
    if rebalance:
        planner.rebalance()
    return planner.result()


@dataclass(frozen=True)
class _Rows:
    """The models in placement order, as columns: row `r` is model `index[r]`, its memory_bytes, replicas and
    kind, the vnode its walk starts at and that vnode's container.

    Gathered by numpy and made Python lists in that order: the passes over every model then read each list
    from start to end. (Python tuples per model, sorted, cost seconds at 1M models: each read landed
    somewhere else in memory.)
    """

    index: list[int]
    memory_bytes: list[int]
    replicas: list[int]
    kinds: list[str]
    starts: list[int]
    firsts: list[int]

    def __iter__(self) -> Iterator[tuple[int, int, int, str, int, int]]:
        columns = (self.index, self.memory_bytes, self.replicas, self.kinds, self.starts, self.firsts)
        return zip(*columns, strict=True)


def _in_placement_order(
    models: Demands,
    kinds: NDArray[np.object_],
    by_name: Sequence[int],
    starts: NDArray[np.int64],
    firsts: NDArray[np.int64],
) -> _Rows:
    """The models' rows: kind-pinned models first, then more replicas, then bigger; the name breaks ties.

    A stable sort of the models in name order by `(kind == "any", -replicas, -memory_bytes)`.
    """
    import numpy as np

    sizes, replicas = _numbers(models.memory_bytes), _numbers(models.replicas)
    named = np.arange(len(models)) if isinstance(by_name, range) else np.array(by_name, dtype=np.int64)
    # lexsort sorts by its last key first.
    order = named[np.lexsort((-sizes[named], -replicas[named], kinds[named] == "any"))]
    return _Rows(
        order.tolist(),
        sizes[order].tolist(),
        replicas[order].tolist(),
        kinds[order].tolist(),
        starts[order].tolist(),
        firsts[order].tolist(),
    )


def _numbers(column: Sequence[int]) -> NDArray[np.int64] | NDArray[np.object_]:
    """A column of non-negative ints as machine words, or as Python ints where one does not fit (they sort
    the same, slower)."""
    import numpy as np

    try:
        return np.array(column, dtype=np.int64)
    except OverflowError:
        return np.array(column, dtype=object)


def _check(containers: Sequence[Capacity]) -> None:
    """The models were checked when their Demands were made."""
    ids: set[str] = set()
    for container in containers:
        if container.id in ids:
            raise ValueError(f"duplicate container {container.id!r}")
        ids.add(container.id)
        if container.kind not in CONTAINER_KINDS:
            raise ValueError(f"container {container.id!r}: unknown kind {container.kind!r}")
        if container.memory_bytes < 0:
            raise ValueError(f"container {container.id!r}: negative memory_bytes")


class _Planner:
    """One planning run. Containers are numbered by sorted id; models keep their index in `models` and are
    visited in placement order (`rows`)."""

    def __init__(self, models: Demands, containers: Sequence[Capacity]) -> None:
        import numpy as np

        by_id = sorted(containers, key=lambda container: container.id)
        self.ids = [container.id for container in by_id]
        self.index = {container_id: i for i, container_id in enumerate(self.ids)}
        self.cap = [container.memory_bytes for container in by_id]
        self.kind = [_GPU if container.kind == "gpu" else _CPU for container in by_id]
        self.models = models
        self.reasons: dict[str, str] = {}
        self.members = [[c for c, kind in enumerate(self.kind) if kind == code] for code in (_GPU, _CPU)]
        self.free = list(self.cap)
        soft, self.pack = self._soft_caps()
        # `room` is what a ring walk may still use of a container: its soft cap minus what it holds.
        self.room = soft
        self._rings: dict[str, Ring] = {}
        # The fallback index, per container kind: sorted `free * n + container`; refreshed lazily from
        # `_dirty` so that placements the walk handles cost nothing here.
        self._by_free: list[list[int]] = [[], []]
        self._key: list[int] = []
        self._dirty: set[int] = set()
        # Per kind, the smallest size that once found no container with room: nothing that big fits now.
        self.full_at = [_INFINITY, _INFINITY]
        self._full: dict[str, int] = {}
        for code in (_GPU, _CPU):
            self._mark_full(code, _INFINITY if self.members[code] else 0)
        names = models.names
        # The models' indices in name order: a range when they come sorted (the usual), else a sort.
        self.by_name: Sequence[int] = range(len(names))
        if not _in_strict_order(names):
            self.by_name = sorted(self.by_name, key=names.__getitem__)
        kinds = np.array(models.kinds, dtype=object)
        self.rows = _in_placement_order(models, kinds, self.by_name, *self._walk_starts(kinds))
        # The containers holding each model's copies. A tuple, so that single copies can share one per
        # container (`_alone`): no list to make per model, and few objects to read when writing the map.
        self.holders: list[tuple[int, ...]] = [()] * len(models)
        self._alone = [(c,) for c in range(len(self.ids))]

    def _walk_starts(self, kinds: NDArray[np.object_]) -> tuple[NDArray[np.int64], NDArray[np.int64]]:
        """For each model, the vnode its walk starts at on the ring of its kind and that vnode's container;
        0 and -1 for a kind without containers, whose models are short before any walk."""
        import numpy as np

        starts = np.zeros(len(kinds), dtype=np.int64)
        firsts = np.full(len(kinds), -1, dtype=np.int64)
        rings = self._used_rings()
        positions = model_positions(self.models.names if rings else ())
        for kind, ring in rings.items():
            of_kind = kinds == kind
            starts[of_kind] = ring.starts(positions[of_kind])
            firsts[of_kind] = np.array(ring.owners, dtype=np.int64)[starts[of_kind]]
        return starts, firsts

    def _soft_caps(self) -> tuple[list[int], list[bool]]:
        """Each container's walk cap: its kind's expected utilization plus slack, at most its memory."""
        wanted = list(map(mul, self.models.memory_bytes, self.models.replicas))
        demand = {
            kind: sum(compress(wanted, map(eq, self.models.kinds, repeat(kind)))) for kind in MODEL_KINDS
        }
        cap_gpu = sum(self.cap[c] for c in self.members[_GPU])
        cap_cpu = sum(self.cap[c] for c in self.members[_CPU])
        # Expected utilization per kind as (numerator, denominator): `any` demand fills whichever kind is
        # emptier until both are equally full (water filling).
        total = demand["gpu"] + demand["cpu"] + demand["any"]
        if not cap_gpu or not cap_cpu:
            gpu = (demand["gpu"] + demand["any"], max(1, cap_gpu))
            cpu = (demand["cpu"] + demand["any"], max(1, cap_cpu))
        elif demand["gpu"] * (cap_gpu + cap_cpu) >= total * cap_gpu:
            gpu, cpu = (demand["gpu"], cap_gpu), (demand["cpu"] + demand["any"], cap_cpu)
        elif demand["cpu"] * (cap_gpu + cap_cpu) >= total * cap_cpu:
            gpu, cpu = (demand["gpu"] + demand["any"], cap_gpu), (demand["cpu"], cap_cpu)
        else:
            gpu = cpu = (total, cap_gpu + cap_cpu)
        targets = (gpu, cpu)
        # Expected utilization + slack as a fraction, exact: (100 * num + slack * den) / (100 * den).
        soft_num = [100 * num + SPREAD_SLACK_PCT * den for num, den in targets]
        soft = [
            min(cap, cap * soft_num[kind] // (100 * targets[kind][1]))
            for cap, kind in zip(self.cap, self.kind, strict=True)
        ]
        pack = [top >= 100 * den for top, (_, den) in zip(soft_num, targets, strict=True)]
        return soft, pack

    def _ring(self, model_kind: str) -> Ring:
        """The ring a model of `model_kind` walks: every container for `any`, else those of that kind."""
        ring = self._rings.get(model_kind)
        if ring is None:
            every = self._rings.get("any")
            if every is None:
                positions: list[int] = []
                owners: list[int] = []
                for c, container_id in enumerate(self.ids):
                    vnodes = vnode_positions(container_id, self.cap[c])
                    positions.extend(vnodes)
                    owners.extend([c] * len(vnodes))
                every = self._rings["any"] = Ring.build(positions, owners, WALK_STEPS)
            code = _KIND_CODES[model_kind][0]
            ring = every if model_kind == "any" else every.only(set(self.members[code]).__contains__)
            self._rings[model_kind] = ring
        return ring

    def _take(self, c: int, size: int) -> None:
        self.free[c] -= size
        self.room[c] -= size
        self._dirty.add(c)

    def keep(self, previous: Mapping[str, Sequence[str]]) -> None:
        """Keep each previous copy whose container exists, has the right kind and room, up to the replicas."""
        index, kind, free, room, names = self.index, self.kind, self.free, self.room, self.models.names
        holders, alone = self.holders, self._alone
        # Without a previous map there is nothing to keep: skip the pass over every model (1 s at 1M).
        for i, size, replicas, model_kind, _, _ in self.rows if previous else ():
            ids = previous.get(names[i])
            if not ids:
                continue
            allowed = _KIND_CODES[model_kind]
            if len(ids) == 1:
                # The common case: one copy, kept if it may stay (no list and no tuple per model).
                c = index.get(ids[0])
                if c is not None and kind[c] in allowed and free[c] >= size:
                    holders[i] = alone[c]
                    free[c] -= size
                    room[c] -= size
                continue
            kept: list[int] = []
            for container_id in ids:
                c = index.get(container_id)
                if c is None or c in kept or len(kept) >= replicas:
                    continue
                if kind[c] not in allowed or free[c] < size:
                    continue
                kept.append(c)
                free[c] -= size
                room[c] -= size
            holders[i] = tuple(kept)
        n = len(self.ids)
        self._key = [free[c] * n + c for c in range(n)]
        self._by_free = [sorted(self._key[c] for c in self.members[code]) for code in (_GPU, _CPU)]

    def place_missing(self) -> None:
        """Place every copy not kept, walking the ring first and falling back to the free-bytes index."""
        room, free, dirty, full = self.room, self.free, self._dirty, self._full
        holders, alone = self.holders, self._alone
        # This loop runs once per model and dominates the planner's time: everything it reads is bound once.
        rings = self._used_rings()
        for i, size, replicas, kind, start, c in self.rows:
            if replicas == 1 and size < full[kind] and room[c] >= size and not holders[i]:
                # The common case far from capacity: one copy, none kept, and the first vnode's container
                # has room. Tested first: it decides two models in three. (A kind without containers is
                # full at size 0, so its models never reach `room[c]` with c = -1.)
                holders[i] = alone[c]
                free[c] -= size
                room[c] -= size
                dirty.add(c)
                continue
            kept = holders[i]
            need = replicas - len(kept)
            if need <= 0:
                continue
            if size >= full[kind]:
                self._short(i, len(kept))
                continue
            chosen = list(kept)
            for c in rings[kind].window(start, WALK_STEPS):
                if room[c] >= size and c not in chosen:
                    chosen.append(c)
                    free[c] -= size
                    room[c] -= size
                    dirty.add(c)
                    need -= 1
                    if not need:
                        break
            while need:
                fallback = self._fallback(size, _KIND_CODES[kind], chosen)
                if fallback is None:
                    self._short(i, len(chosen))
                    break
                chosen.append(fallback)
                self._take(fallback, size)
                need -= 1
            holders[i] = tuple(chosen)

    def _used_rings(self) -> dict[str, Ring]:
        """The rings of the kinds that have models and containers."""
        kinds = set(self.models.kinds)
        return {kind: self._ring(kind) for kind in sorted(kinds) if self._full[kind]}

    def _sync(self) -> None:
        n, free, key, kind = len(self.ids), self.free, self._key, self.kind
        for c in self._dirty:
            keys = self._by_free[kind[c]]
            del keys[bisect_left(keys, key[c])]
            key[c] = free[c] * n + c
            insort(keys, key[c])
        self._dirty.clear()

    def _fallback(self, size: int, allowed: tuple[int, ...], exclude: list[int]) -> int | None:
        """The container for a copy the walk could not place: worst fit to spread, best fit to pack."""
        self._sync()
        n, free, cap = len(self.ids), self.free, self.cap
        pack = all(self.pack[code] for code in allowed)
        best: int | None = None
        for code in allowed:
            keys = self._by_free[code]
            low = bisect_left(keys, size * n)
            if low == len(keys):
                self._mark_full(code, size)
                continue
            span = range(low, len(keys)) if self.pack[code] else range(len(keys) - 1, low - 1, -1)
            for j in span:
                c = keys[j] % n
                if c in exclude:
                    continue
                if best is None:
                    best = c
                elif pack:
                    if free[c] < free[best]:
                        best = c
                # Spread: the lower utilization after placing wins (cross-multiplied, exact).
                elif (cap[c] - free[c] + size) * cap[best] < (cap[best] - free[best] + size) * cap[c]:
                    best = c
                break
        return best

    def _mark_full(self, code: int, size: int) -> None:
        self.full_at[code] = min(self.full_at[code], size)
        self._full.update(gpu=self.full_at[_GPU], cpu=self.full_at[_CPU], any=max(self.full_at))

    def _short(self, i: int, placed: int) -> None:
        kind, replicas, size = self.models.kinds[i], self.models.replicas[i], self.models.memory_bytes[i]
        label = _KIND_LABELS[kind]
        eligible = sum(len(self.members[code]) for code in _KIND_CODES[kind])
        if not eligible:
            reason = f"no {kind} containers" if kind != "any" else "no containers"
        elif eligible < replicas and placed == eligible:
            reason = f"only {eligible} {label} containers"
        elif placed:
            reason = f"no other {label} container has {size} bytes free"
        else:
            reason = f"no {label} container has {size} bytes free"
        if placed:
            reason = f"placed {placed} of {replicas} replicas: {reason}"
        self.reasons[self.models.names[i]] = reason

    def rebalance(self) -> None:
        """Let containers far below their fair share adopt copies whose ring walks now reach them first.

        Fair share is capacity / total capacity x bytes placed, per kind. A container adopts a model that
        starts within ADOPT_DEPTH vnodes before one of its vnodes, taking the copy from the holder that
        the walk reaches later (the fullest, if several), nearest models first and then from the fullest
        donors, up to its fair share: every move lands on an under-filled container.
        """
        n = len(self.ids)
        cap, free = self.cap, self.free
        used = [cap[c] - free[c] for c in range(n)]
        fair = [0] * n
        for code in (_GPU, _CPU):
            total_cap = sum(cap[c] for c in self.members[code])
            placed = sum(used[c] for c in self.members[code])
            for c in self.members[code]:
                fair[c] = cap[c] * placed // total_cap if total_cap else 0
        takers = [c for c in range(n) if used[c] * 100 < fair[c] * ADOPT_BELOW_PCT]
        if not takers:
            return
        taker_set = set(takers)
        takers.sort(key=lambda c: (used[c] - fair[c], c))
        ring_names = ("gpu", "cpu", "any")
        # Models with copies, grouped by ring and by the vnode their walk starts at, near takers only.
        near: dict[str, set[int]] = {}
        vnodes_of: dict[str, dict[int, list[int]]] = {}
        for name in ring_names:
            ring = self._ring(name)
            spots: dict[int, list[int]] = {}
            for vi, owner in enumerate(ring.owners):
                if owner in taker_set:
                    spots.setdefault(owner, []).append(vi)
            vnodes_of[name] = spots
            near[name] = {
                (vi - j) % len(ring) for vis in spots.values() for vi in vis for j in range(ADOPT_DEPTH)
            }
        starting: dict[str, dict[int, list[int]]] = {name: {} for name in ring_names}
        for i, _, _, kind, start, _ in self.rows:
            if not self.holders[i]:
                continue
            if start in near[kind]:
                starting[kind].setdefault(start, []).append(i)
        for c in takers:
            self._adopt(c, fair[c], used, taker_set, vnodes_of, starting)

    def _adopt(
        self,
        c: int,
        fair: int,
        used: list[int],
        takers: set[int],
        vnodes_of: dict[str, dict[int, list[int]]],
        starting: dict[str, dict[int, list[int]]],
    ) -> None:
        cap = self.cap
        best: dict[int, tuple[int, float, str, int, int]] = {}
        for name in ("gpu" if self.kind[c] == _GPU else "cpu", "any"):
            ring = self._ring(name)
            size_of_ring = len(ring)
            for vi in vnodes_of[name].get(c, ()):
                for depth in range(ADOPT_DEPTH):
                    s = (vi - depth) % size_of_ring
                    for i in starting[name].get(s, ()):
                        chosen = self.holders[i]
                        if c in chosen:
                            continue
                        before = set(ring.window(s, depth))
                        if c in before:
                            continue  # reached through an earlier vnode of c
                        movable = [h for h in chosen if h not in before and h not in takers]
                        if not movable:
                            continue
                        donor = max(movable, key=lambda h: (used[h] / cap[h] if cap[h] else 0.0, -h))
                        utilization = used[donor] / cap[donor] if cap[donor] else 0.0
                        candidate = (depth, -utilization, self.models.names[i], i, donor)
                        if i not in best or candidate < best[i]:
                            best[i] = candidate
        for _, _, _, i, donor in sorted(best.values()):
            if used[c] >= fair:
                break
            size = self.models.memory_bytes[i]
            chosen = self.holders[i]
            if size > self.free[c] or donor not in chosen or c in chosen:
                continue
            if used[c] + size - fair > fair - used[c]:
                continue  # overshoots the fair share by more than it is missing
            self.holders[i] = tuple(c if h == donor else h for h in chosen)
            self._take(c, size)
            self._take(donor, -size)
            used[c] += size
            used[donor] -= size

    def result(self) -> Plan:
        """The plan, models in name order (the map's order): writing it then needs no sort."""
        ids, names, holders = self.ids, self.models.names, self.holders
        # Single copies share their container's tuple: a million fewer objects to make and to free.
        alone = [(container_id,) for container_id in ids]
        assignments: dict[str, tuple[str, ...]] = {}
        for i in self.by_name:
            chosen = holders[i]
            if len(chosen) == 1:
                assignments[names[i]] = alone[chosen[0]]
            elif chosen:
                assignments[names[i]] = tuple(map(ids.__getitem__, sorted(chosen)))
        unplaced = {name: self.reasons[name] for name in sorted(self.reasons)}
        used_bytes = {container_id: self.cap[c] - self.free[c] for c, container_id in enumerate(ids)}
        return Plan(assignments, unplaced, used_bytes)
