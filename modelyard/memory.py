"""Memory settings for the processes that move tensors: freed large buffers are reused, not faulted in again.

glibc serves a large allocation (128 KiB and up, the bound rising with use to at most 32 MiB) with a fresh
`mmap` and hands it back to the kernel when it is freed. A router receives every request into a new buffer,
appends the internal name to it (a second buffer), and does the same with the response: at 1 MiB and 16 MiB
the page faults on all that fresh memory cost more CPU than the copies themselves. `reuse_large_buffers`
serves allocations up to the largest message the process takes (at most glibc's ceiling, 32 MiB) from the
heap and keeps freed memory for a few such messages instead of trimming it, so the buffers of one call are
reused by the next; anything larger (an oversize message being refused) still goes straight back to the
kernel. Only on glibc (elsewhere: no change); the price is the memory kept after a burst of large calls.
"""

from __future__ import annotations

import ctypes
import ctypes.util
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
