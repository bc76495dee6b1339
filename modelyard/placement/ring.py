"""Hash rings with virtual nodes: where on the ring a model starts looking for containers.

Positions come from blake2b and shake_128, never Python's `hash()`, so a ring is the same in every process
and on every machine. A container's vnode positions depend only on its id and its memory, so adding or
removing one container leaves every other container's vnodes where they were.

The searches over a whole fleet (a million models, hundreds of thousands of vnodes) run in numpy, imported
when a ring is first built: a Python bisect per model, and the Python lists it reads in random order, cost
seconds at that size.
"""

from __future__ import annotations

import hashlib
import struct
from bisect import bisect_right
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from functools import partial
from itertools import compress
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import numpy as np
    from numpy.typing import NDArray

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


def model_positions(names: Iterable[str]) -> NDArray[np.uint64]:
    """`model_position` of each name, without a Python call per name (15% less time)."""
    import numpy as np

    digests = b"".join(map(hashlib.blake2b.digest, map(_model_hash, map(str.encode, names))))
    return np.frombuffer(digests, dtype=">u8").astype(np.uint64)


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
    _points: NDArray[np.uint64]  # the positions again, for numpy's searches

    @classmethod
    def build(cls, positions: Sequence[int], owners: Sequence[int], max_steps: int) -> Ring:
        """A ring of the vnodes at `positions[i]` (64-bit points) owned by `owners[i]`; equal positions keep
        the given order."""
        import numpy as np

        points = np.array(positions, dtype=np.uint64)
        order = np.argsort(points, kind="stable")
        owned = np.array(owners, dtype=np.int64)[order]
        return cls.presorted(points[order], owned.tolist(), max_steps)

    @classmethod
    def presorted(cls, points: NDArray[np.uint64], owners: list[int], max_steps: int) -> Ring:
        wrapped = list(owners)
        while owners and len(wrapped) < len(owners) + max_steps:
            wrapped.extend(owners)
        return cls(points.tolist(), owners, wrapped, max_steps, points)

    def only(self, keep: Callable[[int], bool]) -> Ring:
        """The ring of the vnodes whose owners `keep` accepts, in the same positions."""
        import numpy as np

        kept = list(map(keep, self.owners))
        return Ring.presorted(
            self._points[np.array(kept, dtype=bool)], list(compress(self.owners, kept)), self._max_steps
        )

    def __len__(self) -> int:
        return len(self.owners)

    def start(self, position: int) -> int:
        """The first vnode strictly after `position` (a 64-bit point), wrapping past the top of the ring."""
        return bisect_right(self.positions, position) % len(self) if self.positions else 0

    def starts(self, positions: NDArray[np.uint64]) -> NDArray[np.int64]:
        """`start` of each position."""
        import numpy as np

        if not len(self):
            return np.zeros(len(positions), dtype=np.int64)
        # searchsorted returns len(self) past the last vnode: the walk wraps to vnode 0.
        found: NDArray[np.int64] = np.searchsorted(self._points, positions, side="right") % len(self)
        return found

    def window(self, start: int, steps: int) -> list[int]:
        if steps > self._max_steps:
            raise ValueError(f"a walk of {steps} steps is longer than this ring supports ({self._max_steps})")
        return self._wrapped[start : start + steps]
