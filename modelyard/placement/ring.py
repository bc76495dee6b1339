"""Hash rings with virtual nodes: where on the ring a model starts looking for containers.

Positions come from blake2b and shake_128, never Python's `hash()`, so a ring is the same in every process
and on every machine. A container's vnode positions depend only on its id and its memory, so adding or
removing one container leaves every other container's vnodes where they were.
"""

from __future__ import annotations

import hashlib
import struct
from array import array
from bisect import bisect_left, bisect_right
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from functools import partial
from itertools import compress

# One vnode per 2 GiB of memory, clamped: big containers attract proportionally more models without a
# 1 TiB container costing hundreds of vnodes, and a tiny one still gets enough to spread its arcs. (1 GiB
# per vnode measured no more even with bounded loads, and the bigger ring made planning 30% slower.)
VNODE_BYTES = 2 << 30
MIN_VNODES = 16
MAX_VNODES = 160

_model_hash = partial(hashlib.blake2b, digest_size=8, person=b"modelyard.model")


def model_position(name: str) -> int:
    """Where a model sits on every ring (a 64-bit point)."""
    return int.from_bytes(_model_hash(name.encode()).digest(), "big")


def model_positions(names: Iterable[str]) -> tuple[int, ...]:
    """`model_position` of each name, without a Python call per name (15% less time)."""
    digests = b"".join(map(hashlib.blake2b.digest, map(_model_hash, map(str.encode, names))))
    return struct.unpack(f">{len(digests) // 8}Q", digests)


def vnode_count(memory_bytes: int) -> int:
    return max(MIN_VNODES, min(MAX_VNODES, memory_bytes // VNODE_BYTES))


def vnode_positions(container_id: str, memory_bytes: int) -> tuple[int, ...]:
    """The 64-bit points of a container's virtual nodes: one extendable-output hash, cut into words."""
    count = vnode_count(memory_bytes)
    stream = hashlib.shake_128(b"modelyard.vnode\0" + container_id.encode()).digest(8 * count)
    return struct.unpack(f">{count}Q", stream)


@dataclass(frozen=True)
class Ring:
    """Virtual nodes sorted by position; `owners[i]` is the container (an index) owning vnode `i`.

    `window(start, steps)` is the walk from vnode `start`: the owners of the next `steps` vnodes, wrapping
    around as often as needed. A walk visits a container once per vnode it owns on the way.
    """

    positions: list[int]
    owners: list[int]
    _wrapped: list[int]
    _max_steps: int
    # `starts` looks the top bits of a position up in `_first` (how many vnodes lie below each slice of the
    # ring) and bisects only that slice of `_points` (the positions again, as machine words), a few vnodes
    # side by side in memory: a bisect over 300k Python ints misses the cache at each of its 19 steps.
    _points: array[int]
    _first: array[int]
    _shift: int

    @classmethod
    def build(cls, positions: Sequence[int], owners: Sequence[int], max_steps: int) -> Ring:
        """A ring of the vnodes at `positions[i]` (64-bit points) owned by `owners[i]`; equal positions keep
        the given order."""
        # Each position with its index in the bits below it: one sort of plain ints, ties by index.
        bits = len(positions).bit_length()
        packed = sorted(position << bits | i for i, position in enumerate(positions))
        low = (1 << bits) - 1
        return cls.presorted([p >> bits for p in packed], [owners[p & low] for p in packed], max_steps)

    @classmethod
    def presorted(cls, positions: list[int], owners: list[int], max_steps: int) -> Ring:
        wrapped = list(owners)
        while owners and len(wrapped) < len(owners) + max_steps:
            wrapped.extend(owners)
        shift = 64 - max(0, len(positions).bit_length() - 2)  # a slice per 2 to 4 vnodes
        pieces = [position >> shift for position in positions]
        first = array("q", [bisect_left(pieces, piece) for piece in range((1 << (64 - shift)) + 1)])
        return cls(positions, owners, wrapped, max_steps, array("Q", positions), first, shift)

    def only(self, keep: Callable[[int], bool]) -> Ring:
        """The ring of the vnodes whose owners `keep` accepts, in the same positions."""
        kept = list(map(keep, self.owners))
        return Ring.presorted(
            list(compress(self.positions, kept)), list(compress(self.owners, kept)), self._max_steps
        )

    def __len__(self) -> int:
        return len(self.owners)

    def start(self, position: int) -> int:
        """The first vnode strictly after `position` (a 64-bit point), wrapping past the top of the ring."""
        return self.starts((position,))[0]

    def starts(self, positions: Iterable[int]) -> list[int]:
        """`start` of each position, without a method call each."""
        points, first, shift, size = self._points, self._first, self._shift, len(self._points)
        if not size:
            return [0 for _ in positions]
        # bisect_right returns `size` past the last vnode: the walk wraps to vnode 0.
        return [bisect_right(points, p, first[p >> shift], first[(p >> shift) + 1]) % size for p in positions]

    def window(self, start: int, steps: int) -> list[int]:
        if steps > self._max_steps:
            raise ValueError(f"a walk of {steps} steps is longer than this ring supports ({self._max_steps})")
        return self._wrapped[start : start + steps]
