"""Memory settings for the processes that move tensors: freed large buffers are reused, not faulted in again.

glibc serves a large allocation (128 KiB and up, the bound rising with use to at most 32 MiB) with a fresh
`mmap` and hands it back to the kernel when it is freed. A router receives every request into a new buffer,
appends the internal name to it (a second buffer), and does the same with the response: at 1 MiB and 16 MiB
the page faults on all that fresh memory cost more CPU than the copies themselves. `reuse_large_buffers`
serves allocations up to the largest message the process takes (at most glibc's ceiling, 32 MiB) from the
heap and keeps freed memory for a few such messages instead of trimming it, so the buffers of one call are
reused by the next; anything larger (an oversize message being refused) still goes straight back to the
kernel. Only on glibc (elsewhere: no change); the price is the memory kept after a burst of large calls.

The processes that hold the fleet view also keep it out of the cyclic garbage collector's walks
(`freeze_long_lived_objects`, below).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import logging
import platform

log = logging.getLogger(__name__)

_M_TRIM_THRESHOLD = -1  # glibc's mallopt parameters (malloc.h)
_M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD_MAX = 32 * 1024**2  # glibc refuses more on 64-bit machines
_INT_MAX = 2**31 - 1
KEPT_MESSAGES = 4  # a router keeps freed memory for this many messages of its largest size


def reuse_large_buffers(largest_message_bytes: int) -> bool:
    """Allocations up to the largest message (at most 32 MiB) served from the heap, and freed memory kept up
    to KEPT_MESSAGES such messages; False where the C library is not glibc or refuses (nothing changed).

    glibc keeps at most what the process used at its peak, and counts the bound per malloc arena (the main
    thread's, and one per busy gRPC thread at most)."""
    if platform.libc_ver()[0] != "glibc":
        return False
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    from_heap = min(largest_message_bytes, MMAP_THRESHOLD_MAX)
    kept = min(KEPT_MESSAGES * largest_message_bytes, _INT_MAX)
    if libc.mallopt(_M_MMAP_THRESHOLD, from_heap) != 1 or libc.mallopt(_M_TRIM_THRESHOLD, kept) != 1:
        return False
    log.debug("malloc: allocations up to %d bytes from the heap, up to %d freed bytes kept", from_heap, kept)
    return True


def release_freed_memory() -> bool:
    """Hands the free pages inside glibc's heaps back to the kernel (`malloc_trim`); False where the C
    library is not glibc (nothing done).

    For after a one-off peak, such as a fleet snapshot parsed and its store values dropped: glibc keeps
    freed memory in its heaps (up to reuse_large_buffers' bound at their top, and any amount below a chunk
    still in use), so a process would hold its load's peak for good."""
    if platform.libc_ver()[0] != "glibc":
        return False
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    libc.malloc_trim(0)
    return True


# -- the cyclic garbage collector and the fleet view ---------------------------------------------------------

FREEZE_EVERY_EVENTS = 1024
_freeze_every: int | None = None  # None: long-lived objects are left to the collector as Python leaves them
_added_since_freeze = 0


def freeze_long_lived_objects(every_events: int | None = FREEZE_EVERY_EVENTS) -> None:
    """For processes that hold the fleet view (router, controller, agents): the objects a store follower
    builds are moved out of the cyclic collector's reach (`gc.freeze`) after a snapshot and after every
    `every_events` store events applied.

    Without it, every full collection walks the whole view again: in benchmarks/test_scale.py's loop-lag
    run (a router following 10,000 models while 30,000 events arrive) full collections held the process
    15-66 ms, the longest matching the largest loop lag (67 ms); with it, none ran in that window.
    Frozen objects are still freed when their last reference goes (reference counting); what the collector
    no longer finds is a reference cycle among them that became garbage after the freeze. Freezes come with
    bursts of store changes (a snapshot, an import, a rebalance), not with calls, so what they can strand is
    bounded by the cycles alive at a few moments; the soak (benchmarks/test_soak.py) judges the processes'
    RSS with it on. None turns it off."""
    global _freeze_every, _added_since_freeze
    _freeze_every, _added_since_freeze = every_events, 0


def long_lived_objects_added(events: int, *, snapshot: bool = False) -> None:
    """A store follower applied `events` store events, or a whole `snapshot`: the heap is frozen when
    `freeze_long_lived_objects` is on and enough came since the last freeze."""
    global _added_since_freeze
    if _freeze_every is None:
        return
    _added_since_freeze += events
    if _added_since_freeze >= _freeze_every or snapshot:
        _added_since_freeze = 0
        gc.freeze()
