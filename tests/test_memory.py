"""Large buffers are reused in the router's process instead of being faulted in fresh for every call."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ALLOCATE_AND_FREE = """
import resource, sys
from modelyard.grpc_options import DEFAULT_MAX_MESSAGE_BYTES
from modelyard.memory import reuse_large_buffers
largest = {"default": None, "reuse": DEFAULT_MAX_MESSAGE_BYTES, "reuse-1mib": 1 << 20}[sys.argv[1]]
applied = None if largest is None else reuse_large_buffers(largest)
block = bytes(range(256)) * 4096  # 1 MiB
faults = []
for _ in range(20):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    # One call of 16 MiB through the router: the request received and renamed, the response received and
    # renamed, all alive at once, then freed.
    buffers = [block * 16 for _ in range(4)]
    del buffers
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(applied, sorted(faults)[10])
"""
PAGES = 4 * (16 << 20) // 4096


def _median_faults(mode: str) -> tuple[str, int]:
    out = subprocess.run(
        [sys.executable, "-c", ALLOCATE_AND_FREE, mode], capture_output=True, text=True, check=True
    ).stdout.split()
    return out[0], int(out[1])


def test_the_buffers_of_a_16_mib_call_are_reused_by_the_next_not_faulted_in_again() -> None:
    _, fresh = _median_faults("default")
    # Without the setting, glibc hands the freed buffers back and faults them in afresh on every call.
    assert fresh > PAGES // 2, f"glibc's default did not fault the call's buffers in ({fresh} faults)"
    applied, reused = _median_faults("reuse")
    assert applied == "True"  # glibc: the settings took
    assert reused < PAGES // 20, f"{reused} page faults per call ({PAGES} pages)"


def test_buffers_larger_than_the_largest_message_still_go_back_to_the_kernel() -> None:
    """A router taking at most 1 MiB keeps no 16 MiB buffers (an oversize message it refuses, say)."""
    applied, faults = _median_faults("reuse-1mib")
    assert applied == "True"
    assert faults > PAGES // 2, f"only {faults} page faults per call: the buffers were kept"


PEAK_AND_RELEASE = """
from modelyard.memory import release_freed_memory, reuse_large_buffers
from modelyard.grpc_options import DEFAULT_MAX_MESSAGE_BYTES
def rss_mib():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) // 1024
reuse_large_buffers(DEFAULT_MAX_MESSAGE_BYTES)  # as a router runs: glibc keeps a lot of freed memory
base = rss_mib()
# A snapshot's peak: 200 MiB of store values (heap chunks, not pymalloc's), every 64th kept (a parsed fleet).
values = [bytes(1024) + i.to_bytes(8, "little") for i in range(200_000)]
kept = values[::64]
del values
held = rss_mib()
print(release_freed_memory(), held - base, rss_mib() - base)
"""


def test_a_peak_freed_is_handed_back_to_the_kernel() -> None:
    out = subprocess.run(
        [sys.executable, "-c", PEAK_AND_RELEASE], capture_output=True, text=True, check=True
    ).stdout.split()
    released, held_mib, after_mib = out[0], int(out[1]), int(out[2])
    assert released == "True"  # glibc
    assert held_mib > 150, f"glibc gave the freed peak back by itself ({held_mib} MiB held)"
    assert after_mib < 30, f"{after_mib} MiB still held after release_freed_memory"


FOLLOW_AND_LOOK = """
import asyncio, gc, sys
from modelyard.memory import FREEZE_EVERY_EVENTS, freeze_long_lived_objects
from modelyard.placement import registry
from modelyard.placement.follow import StoreFollower
from modelyard.placement.model import ModelVersion
from modelyard.placement.store import open_store

if sys.argv[2] == "on":
    freeze_long_lived_objects()

def models(start, count):
    names = (f"m{i:05d}" for i in range(start, start + count))
    return [ModelVersion(name, "1", backend="custom", memory_bytes=4) for name in names]

async def main():
    async with open_store(sys.argv[1]) as store:
        await store.apply({registry.MODELS + m.key: m.to_json() for m in models(0, 500)})
        follower = StoreFollower(store, name="test")
        follower.start()
        await follower.loaded.wait()
        burst = FREEZE_EVERY_EVENTS + 100  # registrations arriving as events once the snapshot is in
        for start in range(500, 500 + burst, 100):
            await store.apply({registry.MODELS + m.key: m.to_json() for m in models(start, 100)})
        while len(follower.fleet.models) < 500 + burst:
            await follower.wait_changed(30, follower.version)
        walked = {id(o) for o in gc.get_objects()}  # what the collector walks (not the frozen)
        fleet = follower.fleet
        from_snapshot, from_events = fleet.models["m00000@1"], fleet.models["m00600@1"]
        print(id(from_snapshot) in walked, id(from_events) in walked, gc.get_freeze_count())
        await follower.stop()

asyncio.run(main())
"""


def _follow_and_look(tmp_path: Path, mode: str) -> tuple[bool, bool, int]:
    store = tmp_path / mode
    out = subprocess.run(
        [sys.executable, "-c", FOLLOW_AND_LOOK, str(store), mode], capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr[-2000:]
    snapshot, events, frozen = out.stdout.split()
    return snapshot == "True", events == "True", int(frozen)


def test_the_fleet_view_a_follower_builds_is_out_of_the_collectors_walks(tmp_path: Path) -> None:
    """With `freeze_long_lived_objects` (as serve, controller, agent and up run): a model from the snapshot
    and one from a burst of events after it are frozen, so no full collection walks the view again."""
    in_snapshot, in_events, frozen = _follow_and_look(tmp_path, "on")
    assert not in_snapshot, "a model from the snapshot is still walked by every full collection"
    assert not in_events, "a model from a burst of events is still walked by every full collection"
    assert frozen > 1_600  # at least the view's 1,624 models
    # Off (a library user's process): Python's collector as it was, nothing frozen.
    in_snapshot, in_events, frozen = _follow_and_look(tmp_path, "off")
    assert in_snapshot and in_events and frozen == 0
